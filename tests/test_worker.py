"""The worker: claiming, leases and heartbeats, recovery of a dead worker's job, retries, graceful stop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from database import JobStatus
from errors import ProviderUnavailable
from pipeline import submit_product
from tests.conftest import ScriptedGenerator, ScriptedRemover, eventually, ring_photo
from worker import Worker


def make_worker(services: Any, **options: Any) -> Worker:
    defaults: dict[str, Any] = {"concurrency": 4, "lease_s": 30, "poll_interval_s": 5, "job_timeout_s": 30,
                                "max_attempts": 3, "retry_backoff_s": 0, "grace_s": 5}
    return Worker(services=services, **{**defaults, **options})


async def queue(services: Any, n: int = 1) -> list[Any]:
    return [await submit_product(services, upload=ring_photo(), title=f"p{i}", jewellery_type=None)
            for i in range(n)]


async def test_run_once_finishes_everything_queued(make_services: Any) -> None:
    services = await make_services()
    products = await queue(services, 3)
    assert await asyncio.wait_for(make_worker(services).run_once(), 30) == 3
    for product in products:
        stored = await services.store.get_product(product.id)
        assert stored is not None and stored.status == JobStatus.DONE


async def test_a_new_upload_starts_at_once_not_on_the_next_poll(make_services: Any) -> None:
    services = await make_services()
    worker = make_worker(services, poll_interval_s=60)
    runner = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.1)  # the worker is now waiting out a 60 s poll interval
        started = time.monotonic()
        [product] = await queue(services)
        await eventually(lambda: _status_is(services, product.id, JobStatus.DONE), timeout_s=10)
        assert time.monotonic() - started < 5
    finally:
        await worker.stop()
        await asyncio.wait_for(runner, 10)


async def _status_is(services: Any, product_id: Any, status: JobStatus) -> bool:
    product = await services.store.get_product(product_id)
    return product is not None and product.status == status


async def test_a_dead_workers_job_is_finished_by_another_after_its_lease_expires(make_services: Any) -> None:
    services = await make_services()
    [product] = await queue(services)
    # A worker claimed it with a short lease and died without a trace.
    dead = await services.store.claim_next_job(worker_id="dead-worker", lease_s=0.2)
    assert dead is not None and dead.id == product.id
    survivor = make_worker(services, lease_s=0.5, worker_id="survivor")
    assert await asyncio.wait_for(survivor.run_once(), 10) == 0, "the lease has not expired yet"
    await asyncio.sleep(0.3)
    assert await asyncio.wait_for(survivor.run_once(), 30) == 1
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.DONE and stored.attempts == 2


async def test_transient_failures_are_retried_until_the_attempt_limit(make_services: Any) -> None:
    remover = ScriptedRemover(fail=ProviderUnavailable("reve", "HTTP 503"))
    services = await make_services(remover=remover)
    [product] = await queue(services)
    worker = make_worker(services, max_attempts=3)
    for _ in range(3):
        await asyncio.wait_for(worker.run_once(), 10)
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.FAILED
    assert remover.calls == 3 and stored.attempts == 3
    assert "503" in (stored.error or "")


async def test_a_transient_failure_is_backed_off(make_services: Any) -> None:
    services = await make_services(remover=ScriptedRemover(fail=ProviderUnavailable("reve", "429", retry_after_s=300)))
    [product] = await queue(services)
    await asyncio.wait_for(make_worker(services).run_once(), 10)
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.PENDING
    assert stored.run_after is not None and stored.run_after > stored.updated_at
    assert await asyncio.wait_for(make_worker(services).run_once(), 10) == 0


async def test_a_job_over_its_timeout_is_released(make_services: Any) -> None:
    services = await make_services(generator=ScriptedGenerator(delay_s=5))
    [product] = await queue(services)
    await asyncio.wait_for(make_worker(services, job_timeout_s=0.3, max_attempts=1).run_once(), 10)
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.FAILED and "timed out" in (stored.error or "")


async def test_a_worker_that_lost_its_lease_stops_writing(make_services: Any) -> None:
    generator = ScriptedGenerator(delay_s=1.0)
    services = await make_services(generator=generator)
    [product] = await queue(services)
    slow = make_worker(services, lease_s=0.3, worker_id="slow")
    runner = asyncio.create_task(slow.run_once())
    await eventually(lambda: _status_is(services, product.id, JobStatus.PROCESSING))
    # Another process decided the job was stale and took it over.
    await asyncio.sleep(0.05)
    original_heartbeat = services.store.heartbeat

    async def no_heartbeat(*_args: Any, **_kwargs: Any) -> bool:
        return await original_heartbeat(product.id, worker_id="nobody", lease_s=0.3)

    object.__setattr__(services.store, "heartbeat", no_heartbeat)
    await asyncio.wait_for(runner, 10)
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.PROCESSING and stored.lease_owner == "slow"
    assert all(v.status != "done" for v in stored.variants), "nothing written after the lease was lost"


async def test_graceful_stop_hands_unfinished_jobs_back(make_services: Any) -> None:
    services = await make_services(generator=ScriptedGenerator(delay_s=30))
    [product] = await queue(services)
    worker = make_worker(services, grace_s=0.2)
    runner = asyncio.create_task(worker.run())
    await eventually(lambda: _status_is(services, product.id, JobStatus.PROCESSING))
    await asyncio.wait_for(worker.stop(), 10)
    await asyncio.wait_for(runner, 10)
    stored = await services.store.get_product(product.id)
    assert stored is not None and stored.status == JobStatus.PENDING
    assert stored.attempts == 0, "a shutdown does not count against the job"
    assert stored.lease_owner is None


async def test_graceful_stop_lets_short_jobs_finish(make_services: Any) -> None:
    services = await make_services(generator=ScriptedGenerator(delay_s=0.3))
    [product] = await queue(services)
    worker = make_worker(services, grace_s=10)
    runner = asyncio.create_task(worker.run())
    await eventually(lambda: _status_is(services, product.id, JobStatus.PROCESSING))
    await asyncio.wait_for(worker.stop(), 15)
    await asyncio.wait_for(runner, 10)
    assert await _status_is(services, product.id, JobStatus.DONE)


async def test_concurrency_is_capped(make_services: Any) -> None:
    generator = ScriptedGenerator(delay_s=0.2)
    services = await make_services(generator=generator)
    await queue(services, 5)
    worker = make_worker(services, concurrency=2)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, worker.running_jobs)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    assert await asyncio.wait_for(worker.run_once(), 30) == 5
    watcher.cancel()
    assert peak == 2
