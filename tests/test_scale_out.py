"""Scale-out: the API and three `python worker.py` processes against real PostgreSQL + PostgREST share 60 uploads;
every job is done exactly once (the provider fakes' call counts prove it)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fakes import nanobanana as nb
from tests.fakes import reve as rv
from tests.fakes.server import serve_in_thread
from tests.service_process import ServiceProcess, WorkerProcess, stopped_cleanly

UPLOADS = 60


def distinct_photo(i: int) -> bytes:
    """A ring photo whose bytes differ per upload, so each Reve call can be traced to one product."""
    size = 160
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.full((size, size, 3), (236, 234, 230), np.uint8)
    radius = np.hypot(yy - size / 2, xx - size / 2)
    image[(radius > 30) & (radius < 45)] = (200, 160, 40)
    image[4:12, 4 + 2 * i : 6 + 2 * i] = (20, 20, 20)  # a mark that moves with i
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def providers() -> Iterator[tuple[rv.FakeReve, nb.FakeNanobanana, dict[str, str]]]:
    reve = rv.FakeReve(api_key="papi.scale-test", latency_s=0.05, credits=100_000)
    nano = nb.FakeNanobanana(api_key="nb-scale-test", generation_s=0.3)
    reve_url, stop_reve = serve_in_thread(reve.app)
    nano_url, stop_nano = serve_in_thread(nano.app)
    yield reve, nano, {"REVE_API_KEY": "papi.scale-test", "REVE_BASE_URL": reve_url,
                       "NANOBANA_API_KEY": "nb-scale-test", "NANOBANA_BASE_URL": nano_url}
    stop_reve()
    stop_nano()


def test_three_workers_and_the_api_do_every_job_exactly_once(tmp_path: Path, supabase_stack, providers) -> None:
    supabase_stack.execute("truncate table public.products")
    reve, nano, provider_env = providers
    proxy = supabase_stack.start_proxy()
    env = {
        **provider_env,
        "SUPABASE_URL": proxy.url,
        "SUPABASE_SERVICE_ROLE_KEY": supabase_stack.service_role_key,
        "STORAGE_BACKEND": "local",  # one machine: the processes share the storage folder
        "DATA_DIR": str(tmp_path / "data"),
        "NANOBANA_POLL_INTERVAL_SECONDS": "0.1",
        "WORKER_POLL_INTERVAL_SECONDS": "0.2",
        "WORKER_CONCURRENCY": "4",
        "RATE_LIMIT_PER_MINUTE": "0",
    }
    api = ServiceProcess({**env, "RUN_WORKER": "false"}, log_path=tmp_path / "api.log").start()
    env["PUBLIC_BASE_URL"] = api.base_url
    workers = [WorkerProcess(env, log_path=tmp_path / f"worker{i}.log").start() for i in range(3)]
    try:
        ids = []
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            for i in range(UPLOADS):
                response = client.post("/process", files={"file": (f"{i}.jpg", distinct_photo(i), "image/jpeg")})
                assert response.status_code == 202, response.text
                ids.append(response.json()["product_id"])
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                rows = client.get("/products", params={"limit": 100}).json()["items"]
                if sum(r["status"] in ("done", "failed") for r in rows) == UPLOADS:
                    break
                time.sleep(0.5)
    finally:
        exits = [w.stop() for w in workers]
        api_exit = api.stop()

    assert all(stopped_cleanly(code) for code in [*exits, api_exit])
    assert sorted(r["id"] for r in rows) == sorted(ids)
    unfinished = [(r["status"], r["error"], r["generated_image_urls"]) for r in rows
                  if r["status"] != "done" or len(r["generated_image_urls"]) != 4]
    assert unfinished == []
    retried = [(r["id"], r["attempts"]) for r in rows if r["attempts"] != 1]
    events = [line for w in workers for line in w.logs().splitlines()
              if any(e in line for e in ("job_released", "job_lease_lost", "job_recovered", "job_failed_internal"))]
    assert retried == [], f"jobs claimed more than once: {retried}; worker events: {events[:20]}"
    # Exactly one cut-out per product, each from a different photo, and four variants each.
    assert (reve.calls, reve.billed) == (UPLOADS, UPLOADS)
    references = {hashlib.sha256(json.dumps(r.json["reference_image"]).encode()).hexdigest() for r in reve.requests}
    assert len(references) == UPLOADS
    assert nano.submits_accepted == 4 * UPLOADS
    # The work was shared: every worker process finished jobs.
    owners = [w.logs().count("job_finished") for w in workers]
    assert all(count > 0 for count in owners), owners
    assert sum(owners) == UPLOADS
