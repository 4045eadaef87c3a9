"""Storage and database faults mid-pipeline: a job is retried or left recoverable — never stuck in `processing`,
never silently `done`."""

from __future__ import annotations

import asyncio
from typing import Any

from database import JobStatus, SqliteStore
from errors import DatabaseError, StorageError
from pipeline import submit_product
from tests.conftest import ring_photo
from worker import Worker


class FlakyStore:
    """The real SQLite store, with chosen methods failing the next N calls (as a PostgREST outage would)."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.failures: dict[str, int] = {}

    def fail(self, method: str, times: int = 1) -> None:
        self.failures[method] = times

    def __getattr__(self, method: str) -> Any:
        real = getattr(self.inner, method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.failures.get(method, 0) > 0:
                self.failures[method] -= 1
                raise DatabaseError(f"{method}: ConnectError")
            return await real(*args, **kwargs)

        return call


class FlakyImages:
    """The real local image store, with uploads whose path contains a marker failing the next N times."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.failing: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def upload(self, bucket: str, path: str, data: bytes, *, content_type: str) -> str:
        for marker, left in self.failing.items():
            if marker in path and left > 0:
                self.failing[marker] -= 1
                raise StorageError(f"upload {path}: HTTP 503", transient=True)
        return await self.inner.upload(bucket, path, data, content_type=content_type)


async def flaky_services(make_services: Any, tmp_path: Any) -> tuple[Any, FlakyStore, FlakyImages]:
    services = await make_services()
    store = FlakyStore(services.store)
    images = FlakyImages(services.images)
    return type(services)(**{**vars(services), "store": store, "images": images}), store, images


def worker(services: Any, **options: Any) -> Worker:
    return Worker(services=services, **{"retry_backoff_s": 0, "lease_s": 30, "max_attempts": 3, **options})


async def status_of(services: Any, product_id: Any) -> Any:
    product = await services.store.inner.get_product(product_id)
    assert product is not None
    return product


async def test_cutout_upload_failing_hands_the_job_back_then_it_finishes(make_services: Any, tmp_path: Any) -> None:
    services, _, images = await flaky_services(make_services, tmp_path)
    images.failing["reve_"] = 1
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    await asyncio.wait_for(worker(services).run_once(), 30)
    final = await status_of(services, product.id)
    assert final.status == JobStatus.DONE and final.attempts == 2


async def test_a_storage_outage_longer_than_the_attempts_ends_failed_with_the_reason(make_services: Any,
                                                                                     tmp_path: Any) -> None:
    services, _, images = await flaky_services(make_services, tmp_path)
    images.failing["reve_"] = 99
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    await asyncio.wait_for(worker(services).run_once(), 30)
    final = await status_of(services, product.id)
    assert final.status == JobStatus.FAILED and "503" in (final.error or "")
    assert final.attempts == 3


async def test_a_variant_write_failing_mid_pipeline_is_retried_not_lost(make_services: Any, tmp_path: Any) -> None:
    services, store, _ = await flaky_services(make_services, tmp_path)
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    store.fail("set_variant", times=1)
    await asyncio.wait_for(worker(services).run_once(), 30)
    final = await status_of(services, product.id)
    assert final.status == JobStatus.DONE and len(final.generated_image_urls) == 4
    assert final.attempts == 2


async def test_the_final_write_failing_is_retried_never_silently_done(make_services: Any, tmp_path: Any) -> None:
    services, store, _ = await flaky_services(make_services, tmp_path)
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    store.fail("update_job", times=2)  # the cut-out record, then the finish
    await asyncio.wait_for(worker(services).run_once(), 30)
    final = await status_of(services, product.id)
    assert final.status == JobStatus.DONE and len(final.generated_image_urls) == 4


async def test_database_down_for_the_release_too_leaves_the_job_to_lease_recovery(make_services: Any,
                                                                                   tmp_path: Any) -> None:
    services, store, _ = await flaky_services(make_services, tmp_path)
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    store.fail("set_variant", times=1)
    store.fail("release_job", times=1)
    first = worker(services, lease_s=0.3)
    await asyncio.wait_for(first.run_once(), 30)
    stuck = await status_of(services, product.id)
    assert stuck.status == JobStatus.PROCESSING, "nobody could write: the lease is all that is left"
    await asyncio.sleep(0.4)
    await asyncio.wait_for(worker(services, worker_id="second").run_once(), 30)
    final = await status_of(services, product.id)
    assert final.status == JobStatus.DONE and final.attempts == 2


async def test_claiming_while_the_database_is_down_does_not_crash_the_worker(make_services: Any,
                                                                              tmp_path: Any) -> None:
    services, store, _ = await flaky_services(make_services, tmp_path)
    product = await submit_product(services, upload=ring_photo(), title="r", jewellery_type=None)
    store.fail("claim_next_job", times=2)
    loop_worker = worker(services, poll_interval_s=0.05)
    runner = asyncio.create_task(loop_worker.run())
    try:
        async with asyncio.timeout(30):
            while (await status_of(services, product.id)).status != JobStatus.DONE:
                await asyncio.sleep(0.05)
    finally:
        await loop_worker.stop()
        await asyncio.wait_for(runner, 10)
