"""Pipeline benchmark: are the variants truly concurrent, does the worker keep its slots busy, and does the API stay
responsive while jobs run?

Provider stand-ins of fixed latency (cut-out 1.0 s, each variant 2.0 s) behind the same concurrency limits as the
real clients; the real embedded store (SQLite), storage folder, image conversions and marketplace render.

    python bench/pipeline.py [--jobs 40] [--concurrency 8]

Prints three figures, each measured in this run:
  1. one job's wall time / the 3.0 s floor (cut-out + one variant)          target <= 1.10
  2. N jobs' total time / the ideal schedule the concurrency limits allow   target <= 1.15
  3. event-loop lag p99 while GET /product is polled during (2)            target <= 50 ms
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ai_clients import CutoutResult, TaskSubmitted, VariantRequest  # noqa: E402
from config import Settings  # noqa: E402
from database import JobStatus  # noqa: E402
from logging_config import configure_logging  # noqa: E402
from main import create_app  # noqa: E402
from pipeline import submit_product  # noqa: E402
from worker import Worker, open_services  # noqa: E402

SAMPLES = REPO.parent / "shared" / "samples"
CUTOUT_S = 1.0
VARIANT_S = 2.0


def sample_inputs() -> tuple[bytes, bytes, bytes]:
    """A real photo, its cut-out (from the ground-truth matte) and a 1024 px RGB "generated" variant."""
    photo_path = SAMPLES / "05_gold_rope_bangle_white_sweep_photo.jpg"
    photo = photo_path.read_bytes()
    rgb = np.asarray(Image.open(photo_path).convert("RGB"))
    alpha = np.asarray(Image.open(str(photo_path).replace("_photo.jpg", "_alpha.png")).convert("L"))
    cutout = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(cutout, "PNG")
    variant = io.BytesIO()
    Image.fromarray(rgb).resize((1024, 1024)).save(variant, "JPEG", quality=90)
    return photo, cutout.getvalue(), variant.getvalue()


class FixedLatencyRemover:
    name = "standin"

    def __init__(self, cutout_png: bytes, limit: int) -> None:
        self._png = cutout_png
        self._limiter = asyncio.Semaphore(limit)

    async def remove_background(self, image: bytes) -> CutoutResult:
        async with self._limiter:
            await asyncio.sleep(CUTOUT_S)
        return CutoutResult(image=self._png, confidence=None)


class FixedLatencyGenerator:
    name = "standin"

    def __init__(self, result: bytes, limit: int) -> None:
        self._result = result
        self._limiter = asyncio.Semaphore(limit)

    async def generate(self, request: VariantRequest, *, task_id: str | None, on_submitted: TaskSubmitted) -> bytes:
        async with self._limiter:
            await on_submitted(f"task-{request.product_id}-{request.spec.index}")
            await asyncio.sleep(VARIANT_S)
        return self._result


def ideal_makespan(jobs: int, worker_slots: int, remover_slots: int, generator_slots: int) -> float:
    """The finishing time of a perfect scheduler under the same limits (FIFO slots, zero overhead)."""
    free_remover = [0.0] * remover_slots
    free_generator = [0.0] * generator_slots
    free_worker = [0.0] * worker_slots
    heapq.heapify(free_remover)
    heapq.heapify(free_generator)
    heapq.heapify(free_worker)
    end = 0.0
    for _ in range(jobs):
        start = heapq.heappop(free_worker)
        cut_start = max(start, heapq.heappop(free_remover))
        cut_end = cut_start + CUTOUT_S
        heapq.heappush(free_remover, cut_end)
        variant_ends = []
        for _ in range(4):
            v_start = max(cut_end, heapq.heappop(free_generator))
            variant_ends.append(v_start + VARIANT_S)
            heapq.heappush(free_generator, v_start + VARIANT_S)
        job_end = max(variant_ends)
        heapq.heappush(free_worker, job_end)
        end = max(end, job_end)
    return end


class LagMonitor:
    """Measures how late a 10 ms sleep wakes up: the event loop's responsiveness."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags_ms.append((time.perf_counter() - before - 0.01) * 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


async def run(jobs: int, concurrency: int) -> None:
    photo, cutout_png, variant = sample_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp),
            public_base_url="http://bench",
            run_worker=False,
            worker_concurrency=concurrency,
            log_level="WARNING",
        )
        async with open_services(settings) as built:
            remover = FixedLatencyRemover(cutout_png, settings.reve_concurrency)
            generator = FixedLatencyGenerator(variant, settings.nanobana_concurrency)
            services = type(built)(**{**vars(built), "remover": remover, "generator": generator})
            worker = Worker.from_settings(services, poll_interval_s=0.5)

            # 1. one job alone
            product = await submit_product(services, upload=photo, title="bench", jewellery_type=None)
            started = time.perf_counter()
            runner = asyncio.create_task(worker.run())
            await wait_done(services, [product.id])
            single_s = time.perf_counter() - started
            floor_s = CUTOUT_S + VARIANT_S

            # 2 and 3. many jobs, with the API polled throughout
            app = create_app(services=services)
            ids = [
                (await submit_product(services, upload=photo, title=f"bench {i}", jewellery_type=None)).id
                for i in range(jobs)
            ]
            started = time.perf_counter()
            monitor = LagMonitor()
            monitor.start()
            poll_latencies: list[float] = []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
                poller = asyncio.create_task(poll(http, ids, poll_latencies))
                await wait_done(services, ids)
                many_s = time.perf_counter() - started
                poller.cancel()
            monitor.stop()
            await worker.stop()
            await runner

    ideal_s = ideal_makespan(jobs, concurrency, settings.reve_concurrency, settings.nanobana_concurrency)
    lags = sorted(monitor.lags_ms)
    p99_lag = lags[int(len(lags) * 0.99) - 1] if lags else float("nan")
    print(f"one job: {single_s:.2f} s over a {floor_s:.1f} s floor           ratio {single_s / floor_s:.3f}  "
          f"(target <= 1.10)")
    print(f"{jobs} jobs, WORKER_CONCURRENCY={concurrency}, REVE_CONCURRENCY={settings.reve_concurrency}, "
          f"NANOBANA_CONCURRENCY={settings.nanobana_concurrency}:")
    print(f"  total {many_s:.2f} s over an ideal {ideal_s:.2f} s          ratio {many_s / ideal_s:.3f}  "
          f"(target <= 1.15)")
    print(f"event loop lag while polling: p50 {statistics.median(lags):.1f} ms, p99 {p99_lag:.1f} ms, "
          f"max {lags[-1]:.1f} ms  (target p99 <= 50 ms)")
    print(f"GET /product during the run: {len(poll_latencies)} polls, "
          f"p50 {statistics.median(poll_latencies):.1f} ms, "
          f"p99 {sorted(poll_latencies)[int(len(poll_latencies) * 0.99) - 1]:.1f} ms")


async def wait_done(services: Any, ids: list[Any]) -> None:
    remaining = set(ids)
    while remaining:
        for product_id in list(remaining):
            product = await services.store.get_product(product_id)
            if product is not None and product.status in (JobStatus.DONE, JobStatus.FAILED):
                if product.status != JobStatus.DONE:
                    raise RuntimeError(f"job {product_id} failed: {product.error}")
                remaining.discard(product_id)
        await asyncio.sleep(0.02)


async def poll(http: httpx.AsyncClient, ids: list[Any], latencies: list[float]) -> None:
    i = 0
    while True:
        started = time.perf_counter()
        response = await http.get(f"/product/{ids[i % len(ids)]}")
        response.raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
        i += 1
        await asyncio.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    configure_logging(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"), json_logs=False)
    asyncio.run(run(args.jobs, args.concurrency))


if __name__ == "__main__":
    main()
