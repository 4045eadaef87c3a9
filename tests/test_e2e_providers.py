"""End to end with the real Reve and NanoBanana clients against independent fakes built to PROVIDERS.md.

Everything is real but the providers: the app's HTTP routes, the worker, SQLite, the storage folder served by the
app (NanoBanana fetches the cut-out from it by URL, as the real one does), the clients with their retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from config import Settings
from database import JobStatus, VariantStatus
from main import create_app
from tests.conftest import framed, ring_photo
from tests.fakes import nanobanana as nb
from tests.fakes import reve as rv
from tests.fakes.routing import HostRouter
from worker import Worker, open_services

SHOP = "http://shop.test"


@dataclass
class Stack:
    api: httpx.AsyncClient
    services: Any
    reve: rv.FakeReve
    nano: nb.FakeNanobanana

    async def upload(self, photo: bytes | None = None) -> str:
        response = await self.api.post("/process", files={"file": ("p.jpg", photo or ring_photo(), "image/jpeg")})
        assert response.status_code == 202, response.text
        return str(response.json()["product_id"])

    async def run_jobs(self) -> None:
        await asyncio.wait_for(Worker.from_settings(self.services, retry_backoff_s=0).run_once(), 60)

    async def product(self, product_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/product/{product_id}")
        assert response.status_code == 200
        return dict(response.json())

    async def fetch(self, url: str) -> bytes:
        assert url.startswith(SHOP)
        response = await self.api.get(url.removeprefix(SHOP))
        assert response.status_code == 200
        return response.content


@pytest.fixture
async def stack(make_settings: Any) -> AsyncIterator[Stack]:
    async with open_stack(make_settings) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_stack(make_settings: Any, **overrides: Any) -> AsyncIterator[Stack]:
    settings: Settings = make_settings(
        public_base_url=SHOP,
        reve_api_key="papi.test-key",
        nanobana_api_key="nb-test-key",
        reve_base_url="http://api.reve.test",
        nanobana_base_url="http://api.nano.test",
        nanobana_poll_interval_seconds=0.02,
        nanobana_deadline_seconds=2,
        retry_wait_max_seconds=0,
        max_retries=3,
        **overrides,
    )
    reve = rv.FakeReve(api_key="papi.test-key")
    shop_router = HostRouter({})
    nano = nb.FakeNanobanana(api_key="nb-test-key", fetch_transport=shop_router, generation_s=0.05)
    router = HostRouter({"api.reve.test": httpx.ASGITransport(app=reve.app),
                         "api.nano.test": httpx.ASGITransport(app=nano.app)})
    async with open_services(settings, transport=router) as services:
        app = create_app(services=services)
        shop_router.routes["shop.test"] = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SHOP) as api:
            yield Stack(api=api, services=services, reve=reve, nano=nano)


async def test_success_end_to_end(stack: Stack) -> None:
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "done", row["error"]
    assert len(row["generated_image_urls"]) == 4
    assert row["image_url"] == row["generated_image_urls"][0]
    assert (stack.reve.billed, stack.nano.submits_accepted) == (1, 4)
    cutout = Image.open(io.BytesIO(await stack.fetch(row["cutout_url"])))
    assert cutout.mode == "RGBA" and cutout.getchannel("A").getextrema() == (0, 255)
    for url in row["generated_image_urls"]:
        variant = Image.open(io.BytesIO(await stack.fetch(url)))
        assert variant.format == "PNG" and variant.size[0] >= 512
    # NanoBanana fetched our cut-out by its public URL, as the real service does.
    assert all(task.fetched for task in stack.nano.tasks.values())


async def test_reve_cutout_with_the_local_scenes_keeps_the_pieces_own_pixels(make_settings: Any) -> None:
    """VARIANT_GENERATOR=local beside Reve: the four scenes are rendered here around Reve's cut-out, pixel for pixel,
    and NanoBanana is never called."""
    from studio import SCENE_FILL, SCENE_FRAME_PX, place_piece

    async with open_stack(make_settings, variant_generator="local") as stack:
        assert (stack.services.remover.name, stack.services.generator.name) == ("reve", "local")
        product_id = await stack.upload()
        await stack.run_jobs()
        row = await stack.product(product_id)
        assert row["status"] == "done", row["error"]
        assert (stack.reve.billed, stack.nano.submits_accepted, len(stack.nano.tasks)) == (1, 0, 0)
        cutout = np.asarray(Image.open(io.BytesIO(await stack.fetch(row["cutout_url"]))).convert("RGBA"))
        placement = place_piece(cutout, SCENE_FRAME_PX, SCENE_FILL)
        piece_rgb, piece_alpha = framed(placement, SCENE_FRAME_PX)
        opaque = piece_alpha == 255
        assert opaque.any()
        for url in row["generated_image_urls"]:
            scene = np.asarray(Image.open(io.BytesIO(await stack.fetch(url))).convert("RGB"))
            assert scene.shape == (SCENE_FRAME_PX, SCENE_FRAME_PX, 3)
            assert np.array_equal(scene[opaque], piece_rgb[opaque])


async def test_one_variant_failing_gives_three_urls_and_done(stack: Stack) -> None:
    stack.nano.outcome_for(outcome="fail", prompt_contains="burgundy velvet", error_message="generation failed")
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "done"
    assert len(row["generated_image_urls"]) == 3
    velvet = row["variants"][1]
    assert velvet["label"] == "Velvet — Boutique" and velvet["status"] == "failed" and velvet["error"]
    assert stack.nano.submits_accepted == 4, "the failed task is not resubmitted"


async def test_all_four_failing_ends_failed_with_a_reason(stack: Stack) -> None:
    stack.nano.outcome_for(outcome="fail", error_message="the model refused")
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "failed"
    assert row["generated_image_urls"] == []
    assert "the model refused" in row["error"]
    assert stack.nano.submits_accepted == 4


async def test_retrigger_without_a_new_photo_makes_no_reve_call(stack: Stack) -> None:
    product_id = await stack.upload()
    await stack.run_jobs()
    first = await stack.product(product_id)
    assert (await stack.api.post(f"/process/{product_id}")).status_code == 202
    await stack.run_jobs()
    second = await stack.product(product_id)
    assert second["status"] == "done"
    assert stack.reve.calls == 1
    assert second["cutout_url"] == first["cutout_url"]
    assert stack.nano.submits_accepted == 8


async def test_transient_faults_are_ridden_out(stack: Stack) -> None:
    from tests.fakes.server import Drop

    stack.reve.enqueue(rv.HttpError(429, retry_after=0.01))
    stack.reve.enqueue(rv.HttpError(503))
    stack.nano.enqueue("submit", nb.BodyCode(455))
    stack.nano.enqueue("submit", nb.HttpError(500))
    stack.nano.enqueue("poll", Drop())
    stack.nano.enqueue("poll", nb.BodyCode(500))
    stack.nano.enqueue("download", nb.HttpError(502))
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "done" and len(row["generated_image_urls"]) == 4
    assert stack.reve.billed == 1
    assert stack.nano.submits_accepted == 4, "each variant billed exactly once"


async def test_content_violation_fails_the_job_without_variants(stack: Stack) -> None:
    stack.reve.enqueue(rv.ContentViolation())
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "failed" and "content violation" in row["error"]
    assert stack.nano.submits_received == 0


@pytest.mark.parametrize("fault", [rv.OpaqueCutout(), rv.CorruptImage("truncated")])
async def test_a_cutout_without_alpha_or_unreadable_is_refused(stack: Stack, fault: Any) -> None:
    stack.reve.enqueue(fault)
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "failed" and "cut-out" in row["error"]
    assert stack.nano.submits_received == 0


async def test_out_of_credits_is_not_retried(stack: Stack) -> None:
    stack.reve.enqueue(rv.HttpError(402))
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "failed" and "402" in row["error"]
    assert stack.reve.calls == 1


async def test_reve_down_for_longer_than_the_retries_hands_the_job_back(stack: Stack) -> None:
    stack.reve.enqueue(rv.HttpError(503), times=4)  # MAX_RETRIES=3: one attempt's four calls all fail
    product_id = await stack.upload()
    await asyncio.wait_for(Worker.from_settings(stack.services, retry_backoff_s=0.5).run_once(), 60)
    row = await stack.product(product_id)
    assert row["status"] == "pending" and row["attempts"] == 1, "handed back, not lost and not failed"
    assert row["error"] is None and stack.reve.calls == 4

    await asyncio.sleep(0.6)  # the job's back-off
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "done" and row["attempts"] == 2
    assert (stack.reve.calls, stack.reve.billed) == (5, 1)


async def test_a_variant_whose_result_expired_fails_alone(stack: Stack) -> None:
    stack.nano.outcome_for(outcome="url_404", prompt_contains="Carrara")
    product_id = await stack.upload()
    await stack.run_jobs()
    row = await stack.product(product_id)
    assert row["status"] == "done" and len(row["generated_image_urls"]) == 3
    marble = row["variants"][2]
    assert marble["status"] == VariantStatus.FAILED and "404" in marble["error"]
    assert JobStatus(row["status"]) == JobStatus.DONE


async def test_logs_are_json_with_request_and_product_ids_and_never_secrets(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import logging

    import structlog

    from logging_config import configure_logging

    secrets = ["papi.test-key", "nb-test-key"]
    configure_logging(level="DEBUG", json_logs=True, secrets=secrets)
    try:
        stack.reve.enqueue(rv.HttpError(503, message="upstream said Bearer papi.test-key is throttled"))
        stack.nano.enqueue("submit", nb.BodyCode(401, msg="key nb-test-key rejected"))
        stack.nano.enqueue("poll", nb.HttpError(500))
        product_id = await stack.upload()
        await stack.run_jobs()
        await stack.api.get(f"/product/{product_id}")
        structlog.get_logger("test").error("diagnostic", api_key="papi.test-key",
                                           headers={"Authorization": "Bearer nb-test-key"})
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    output = capsys.readouterr().out
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(events) > 10
    for secret in secrets:
        assert secret not in output
    requests = [e for e in events if e["event"] == "request"]
    assert requests and all(len(e["request_id"]) >= 16 for e in requests)
    job_events = [e for e in events if e["event"] in ("job_claimed", "cutout_done", "variant_done", "job_finished")]
    assert {e["event"] for e in job_events} >= {"job_claimed", "cutout_done", "job_finished"}
    assert all(e["product_id"] == product_id for e in job_events)
    assert all(e["level"] and e["timestamp"] for e in events)


async def test_a_provider_message_quoting_our_key_never_reaches_the_row(stack: Stack) -> None:
    stack.nano.outcome_for(outcome="fail", prompt_contains="Carrara")
    stack.nano.enqueue("submit", nb.BodyCode(401, msg="key nb-test-key rejected"))
    product_id = await stack.upload()
    await stack.run_jobs()
    response = await stack.api.get(f"/product/{product_id}")
    assert "nb-test-key" not in response.text
    assert "[redacted]" in response.text


async def test_production_shape_supabase_rows_and_storage_reve_and_nanobanana(make_settings: Any,
                                                                              clean_products: Any) -> None:
    """Every backend remote: rows in real PostgreSQL through PostgREST, files in (a fake of) Supabase Storage,
    Reve and NanoBanana fakes; NanoBanana fetches the cut-out from Storage's public URL."""
    from tests.fakes.supabase_storage import FakeStorage

    stack = clean_products
    storage = FakeStorage(service_role_key=stack.service_role_key)
    settings: Settings = make_settings(
        supabase_url="http://supabase.test",
        supabase_service_role_key=stack.service_role_key,
        reve_api_key="papi.test-key", nanobana_api_key="nb-test-key",
        reve_base_url="http://api.reve.test", nanobana_base_url="http://api.nano.test",
        nanobana_poll_interval_seconds=0.02, retry_wait_max_seconds=0,
    )
    reve = rv.FakeReve(api_key="papi.test-key")
    nano = nb.FakeNanobanana(api_key="nb-test-key", generation_s=0.05,
                             fetch_transport=HostRouter({"supabase.test": httpx.ASGITransport(app=storage.app)}))
    providers = HostRouter({"api.reve.test": httpx.ASGITransport(app=reve.app),
                            "api.nano.test": httpx.ASGITransport(app=nano.app)})
    supabase = stack.transport(storage_transport=httpx.ASGITransport(app=storage.app))
    async with open_services(settings, transport=providers, supabase_transport=supabase) as services:
        assert (services.backends.database, services.backends.storage) == ("supabase", "supabase")
        app = create_app(services=services)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SHOP) as api:
            accepted = await api.post("/process", files={"file": ("p.jpg", ring_photo(), "image/jpeg")})
            assert accepted.status_code == 202
            product_id = accepted.json()["product_id"]
            await asyncio.wait_for(Worker.from_settings(services, retry_backoff_s=0).run_once(), 60)
            row = (await api.get(f"/product/{product_id}")).json()
    assert row["status"] == "done", row["error"]
    assert len(row["generated_image_urls"]) == 4
    assert row["raw_image_url"].startswith("http://supabase.test/storage/v1/object/public/plant-images/products/")
    for n, url in enumerate(row["generated_image_urls"], 1):
        assert f"/object/public/plant-images/products/processed/{product_id}_v{n}.png?v=" in url
        stored = storage.get_object("plant-images", f"products/processed/{product_id}_v{n}.png")
        assert stored is not None and stored.content_type == "image/png"
    cutout = storage.get_object("plant-images", f"products/temp/reve_{product_id}.png")
    assert cutout is not None and cutout.content_type == "image/png"
    assert stack.execute(f"select status from products where id = '{product_id}'") == "done"
    assert (reve.billed, nano.submits_accepted) == (1, 4)
