"""Crashes and shutdowns of a real service process: nothing is lost and nothing is paid twice.

The service runs as an OS process against the Reve and NanoBanana fakes served on loopback ports (they live in the
test process, so they outlive the service and count every billed call).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ring_photo
from tests.fakes import nanobanana as nb
from tests.fakes import reve as rv
from tests.fakes.server import serve_in_thread
from tests.service_process import ServiceProcess, free_port, stopped_cleanly


@dataclass
class Providers:
    reve: rv.FakeReve
    nano: nb.FakeNanobanana
    env: dict[str, str]


@pytest.fixture
def providers() -> Iterator[Providers]:
    reve = rv.FakeReve(api_key="papi.crash-test")
    nano = nb.FakeNanobanana(api_key="nb-crash-test", generation_s=0.1)
    reve_url, stop_reve = serve_in_thread(reve.app)
    nano_url, stop_nano = serve_in_thread(nano.app)
    env = {
        "REVE_API_KEY": "papi.crash-test", "REVE_BASE_URL": reve_url,
        "NANOBANA_API_KEY": "nb-crash-test", "NANOBANA_BASE_URL": nano_url,
        "NANOBANA_POLL_INTERVAL_SECONDS": "0.1", "RETRY_WAIT_MAX_SECONDS": "0",
        "JOB_LEASE_SECONDS": "3", "WORKER_POLL_INTERVAL_SECONDS": "0.2",
    }
    yield Providers(reve=reve, nano=nano, env=env)
    stop_reve()
    stop_nano()


def start_service(tmp_path: Path, providers: Providers, port: int, **extra: str) -> ServiceProcess:
    env = {"DATA_DIR": str(tmp_path / "data"), **providers.env, **extra}
    return ServiceProcess(env, log_path=tmp_path / "service.log", port=port).start()


def upload(service: ServiceProcess) -> str:
    response = httpx.post(f"{service.base_url}/process", files={"file": ("p.jpg", ring_photo(), "image/jpeg")})
    assert response.status_code == 202, response.text
    return str(response.json()["product_id"])


def row(service: ServiceProcess, product_id: str) -> dict:
    return dict(httpx.get(f"{service.base_url}/product/{product_id}", timeout=10).json())


def wait_for(check, timeout_s: float = 60.0, what: str = "condition") -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def test_sigkill_mid_job_then_restart_finishes_without_paying_twice(tmp_path: Path, providers: Providers) -> None:
    # Variant 1 is quick; the other three are slow enough that the kill lands after their tasks were submitted.
    providers.nano.outcome_for(outcome="success", prompt_contains="navy-blue", generation_s=0.1)
    providers.nano.outcome_for(outcome="success", generation_s=6.0)
    port = free_port()
    service = start_service(tmp_path, providers, port)
    product_id = upload(service)

    def variant_1_done_and_rest_submitted() -> dict | None:
        current = row(service, product_id)
        variants = current["variants"]
        ready = variants[0]["status"] == "done" and all(v["task_id"] for v in variants[1:])
        return current if ready else None

    before = wait_for(variant_1_done_and_rest_submitted, what="variant 1 done and the others submitted")
    service.signal(signal.SIGKILL)
    assert service.process is not None and service.process.wait(10) == -signal.SIGKILL
    assert (providers.reve.billed, providers.nano.submits_accepted) == (1, 4)

    restarted = start_service(tmp_path, providers, port)
    try:
        final = wait_for(lambda: (r := row(restarted, product_id))["status"] in ("done", "failed") and r,
                         timeout_s=90, what="the job to finish after the restart")
    finally:
        restarted.stop()
    assert final["status"] == "done", final["error"]
    assert len(final["generated_image_urls"]) == 4
    assert final["attempts"] == 2, "recovered from the dead worker's lease, then finished"
    assert final["variants"][0]["url"] == before["variants"][0]["url"], "the finished variant was kept"
    assert final["cutout_url"] == before["cutout_url"]
    assert providers.reve.billed == 1, "the cut-out was reused"
    assert providers.nano.submits_accepted == 4, "submitted tasks were resumed by polling, not submitted again"
    for v in before["variants"][1:]:
        assert providers.nano.tasks[v["task_id"]].polls > 1


def test_sigterm_hands_unfinished_jobs_back_and_they_resume(tmp_path: Path, providers: Providers) -> None:
    providers.nano.outcome_for(outcome="success", generation_s=5.0)
    port = free_port()
    service = start_service(tmp_path, providers, port, SHUTDOWN_GRACE_SECONDS="0.5")
    product_id = upload(service)
    wait_for(lambda: all(v["task_id"] for v in row(service, product_id)["variants"]), what="tasks submitted")
    assert stopped_cleanly(service.stop(timeout_s=20)), service.logs()[-2000:]

    restarted = start_service(tmp_path, providers, port)
    try:
        handed_back = row(restarted, product_id)
        assert handed_back["status"] in ("pending", "processing", "done")
        final = wait_for(lambda: (r := row(restarted, product_id))["status"] in ("done", "failed") and r,
                         timeout_s=60, what="the job to finish")
    finally:
        restarted.stop()
    assert final["status"] == "done" and len(final["generated_image_urls"]) == 4
    assert final["attempts"] == 1, "a graceful hand-back does not count as an attempt"
    assert (providers.reve.billed, providers.nano.submits_accepted) == (1, 4)
    assert "worker_draining" in service.logs() or "job_released" in service.logs()


def test_sigterm_lets_a_short_job_finish(tmp_path: Path, providers: Providers) -> None:
    # The results download slowly: SIGTERM lands while the job still needs a second or so.
    from tests.fakes.server import Delay

    providers.nano.outcome_for(outcome="success", generation_s=0.2)
    providers.nano.enqueue("download", Delay(1.5), times=4)
    port = free_port()
    service = start_service(tmp_path, providers, port, SHUTDOWN_GRACE_SECONDS="20")
    product_id = upload(service)
    # NanoBanana has fetched the cut-out from us (it cannot once our HTTP server closes); results are on their way.
    wait_for(lambda: len(providers.nano.tasks) == 4 and all(t.fetched for t in providers.nano.tasks.values()),
             what="NanoBanana to fetch the cut-out")
    assert row(service, product_id)["status"] == "processing"
    assert stopped_cleanly(service.stop(timeout_s=30))
    # Look at the row with a service that runs no worker: the job was finished before the first one exited.
    inspector = start_service(tmp_path, providers, port, RUN_WORKER="false")
    try:
        final = row(inspector, product_id)
    finally:
        inspector.stop()
    assert final["status"] == "done" and final["attempts"] == 1
    assert providers.nano.submits_accepted == 4
