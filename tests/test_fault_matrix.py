"""The provider fault matrix: every failure mode of PROVIDERS.md for both providers, alone and mixed across the
four variants, with the job's end state and the billed calls asserted — and a re-run that never pays again for the
cut-out or for a finished variant.

Runs the real clients, pipeline, worker and app against the in-process fakes (tests/fakes), which enforce the
documented API; faults are injected at the fakes' HTTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fakes import nanobanana as nb
from tests.fakes import reve as rv
from tests.fakes.server import Drop
from tests.test_e2e_providers import Stack, stack  # noqa: F401  (the fixture)

PROMPTS = {1: "navy-blue", 2: "burgundy velvet", 3: "Carrara", 4: "charcoal gradient"}


@dataclass
class Case:
    reve: list[Any] = field(default_factory=list)
    outcomes: dict[int, str] = field(default_factory=dict)
    nano: list[tuple[str, Any]] = field(default_factory=list)
    status: str = "done"
    urls: int = 4
    reve_billed: int = 1
    reve_calls: int = 1
    nano_billed: int = 4

    @property
    def cutout(self) -> bool:
        return self.nano_billed > 0 or self.urls > 0


REVE_CASES = {
    "reve 400 bad request": Case(reve=[rv.HttpError(400)], status="failed", urls=0, reve_billed=0, nano_billed=0),
    "reve 401 bad key": Case(reve=[rv.HttpError(401)], status="failed", urls=0, reve_billed=0, nano_billed=0),
    "reve 402 no credits": Case(reve=[rv.HttpError(402)], status="failed", urls=0, reve_billed=0, nano_billed=0),
    "reve 404": Case(reve=[rv.HttpError(404)], status="failed", urls=0, reve_billed=0, nano_billed=0),
    "reve 422 unreadable": Case(reve=[rv.HttpError(422)], status="failed", urls=0, reve_billed=0, nano_billed=0),
    "reve 429 then ok": Case(reve=[rv.HttpError(429, retry_after=0.01)], reve_calls=2),
    "reve 500 then ok": Case(reve=[rv.HttpError(500)], reve_calls=2),
    "reve 502 503 then ok": Case(reve=[rv.HttpError(502), rv.HttpError(503)], reve_calls=3),
    "reve dropped connection then ok": Case(reve=[Drop()], reve_calls=2),
    "reve content violation": Case(reve=[rv.ContentViolation()], status="failed", urls=0, reve_billed=0,
                                   nano_billed=0),
    "reve corrupt image": Case(reve=[rv.CorruptImage("truncated")], status="failed", urls=0, nano_billed=0),
    "reve not base64": Case(reve=[rv.CorruptImage("invalid_base64")], status="failed", urls=0, nano_billed=0),
    "reve cut-out without alpha": Case(reve=[rv.OpaqueCutout()], status="failed", urls=0, nano_billed=0),
}

NANO_CASES = {
    "nano task failed": Case(outcomes={2: "fail"}, urls=3),
    "nano task creation failed": Case(outcomes={3: "create_failed"}, urls=3),
    "nano success with empty url": Case(outcomes={4: "success_empty_url"}, urls=3),
    "nano result url expired": Case(outcomes={1: "url_404"}, urls=3),
    "nano task never finishes": Case(outcomes={2: "never_finish"}, urls=3),
    "nano all four fail": Case(outcomes={i: "fail" for i in (1, 2, 3, 4)}, status="failed", urls=0),
    "nano mixed failures": Case(outcomes={2: "fail", 3: "success_empty_url", 4: "url_404"}, urls=1),
    "nano submit 400": Case(nano=[("submit", nb.BodyCode(400))], urls=3, nano_billed=3),
    "nano submit 401": Case(nano=[("submit", nb.BodyCode(401))], urls=3, nano_billed=3),
    "nano submit 402": Case(nano=[("submit", nb.BodyCode(402))], urls=3, nano_billed=3),
    "nano submit 429 body code": Case(nano=[("submit", nb.BodyCode(429))]),
    "nano submit 455 maintenance": Case(nano=[("submit", nb.BodyCode(455))]),
    "nano submit 500 501 505": Case(nano=[("submit", nb.BodyCode(500)), ("submit", nb.BodyCode(501)),
                                          ("submit", nb.BodyCode(505))]),
    "nano submit HTTP 429 503": Case(nano=[("submit", nb.HttpError(429, retry_after=0.01)),
                                           ("submit", nb.HttpError(503))]),
    "nano submit dropped": Case(nano=[("submit", Drop())]),
    "nano poll failures": Case(nano=[("poll", Drop()), ("poll", nb.BodyCode(500)), ("poll", nb.HttpError(503))]),
    "nano download 502": Case(nano=[("download", nb.HttpError(502))]),
    "nano corrupt download": Case(nano=[("download", nb.CorruptDownload())], urls=3),
    "mixed: reve 503, nano 455, a failed task, a poll drop": Case(
        reve=[rv.HttpError(503)], reve_calls=2, outcomes={4: "fail"},
        nano=[("submit", nb.BodyCode(455)), ("poll", Drop())], urls=3),
}


@pytest.mark.parametrize("case", [*REVE_CASES.values(), *NANO_CASES.values()],
                         ids=[*REVE_CASES, *NANO_CASES])
async def test_fault_matrix(stack: Stack, case: Case) -> None:  # noqa: F811
    for fault in case.reve:
        stack.reve.enqueue(fault)
    for index, outcome in case.outcomes.items():
        stack.nano.outcome_for(outcome=outcome, prompt_contains=PROMPTS[index],
                               generation_s=60 if outcome == "never_finish" else None)
    for endpoint, fault in case.nano:
        stack.nano.enqueue(endpoint, fault)
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)

    assert row["status"] == case.status, row["error"]
    assert len(row["generated_image_urls"]) == case.urls
    assert (stack.reve.calls, stack.reve.billed) == (case.reve_calls, case.reve_billed)
    assert stack.nano.submits_accepted == case.nano_billed
    if case.status == "failed":
        assert row["error"]
    assert (row["cutout_url"] is not None) == case.cutout
    failed = [v for v in row["variants"] if v["status"] == "failed"]
    assert len(failed) == (4 - case.urls if case.cutout else 0)
    assert all(v["error"] for v in failed)
    assert [v["url"] for v in row["variants"] if v["status"] == "done"] == row["generated_image_urls"]

    # A re-run of a job that got its cut-out never pays for it again.
    if case.cutout:
        stack.nano.reset()
        assert (await stack.api.post(f"/process/{product_id}")).status_code == 202
        await stack.run_jobs()
        again = await stack.product(product_id)
        assert again["status"] == "done"
        assert stack.reve.billed == case.reve_billed, "the cut-out was reused"
