"""One product's run on the embedded stores with scripted providers: reuse, concurrency, partial failure."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest
from PIL import Image

from database import JobStatus, Product, VariantStatus
from errors import JobRunning, ProductNotFound, ProviderRejected, ProviderUnavailable, StorageError, UnsupportedImage
from pipeline import Services, resubmit_product, run_job, submit_product
from tests.conftest import ScriptedGenerator, ScriptedRemover, jpeg_bytes, ring_photo


async def submit_and_claim(services: Services, photo: bytes | None = None) -> Product:
    await submit_product(services, upload=photo or ring_photo(), title="Ring", jewellery_type="ring")
    job = await services.store.claim_next_job(worker_id="w1", lease_s=60)
    assert job is not None
    return job


async def read_url(services: Services, url: str) -> bytes:
    """Resolve one of our stored URLs back to its bytes through the image store."""
    path = url.split("/storage/", 1)[1].split("?", 1)[0]
    bucket, key = path.split("/", 1)
    return await services.images.download(bucket, key)


async def test_a_run_stores_everything_and_finishes_done(make_services: Any) -> None:
    services = await make_services()
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")

    assert product.status == JobStatus.DONE
    assert product.error is None and product.lease_owner is None
    assert len(product.generated_image_urls) == 4
    assert product.image_url == product.generated_image_urls[0]
    assert [v.url for v in product.variants] == product.generated_image_urls
    assert all(v.status == VariantStatus.DONE for v in product.variants)
    assert product.cutout_confidence == pytest.approx(0.9)
    assert product.raw_sha256 is not None and len(product.raw_sha256) == 64

    layout = services.layout
    assert product.cutout_url is not None and f"products/temp/reve_{job.id}.png?v=" in product.cutout_url
    for n, url in enumerate(product.generated_image_urls, 1):
        assert f"{layout.processed_folder}/{job.id}_v{n}.png?v=" in url
        assert Image.open(io.BytesIO(await read_url(services, url))).format == "PNG"
    cutout = Image.open(io.BytesIO(await read_url(services, product.cutout_url)))
    assert cutout.mode == "RGBA"
    assert product.marketplace_image_url is not None
    assert Image.open(io.BytesIO(await read_url(services, product.marketplace_image_url))).format == "JPEG"


async def test_variants_run_concurrently(make_services: Any) -> None:
    services = await make_services(generator=ScriptedGenerator(delay_s=0.3))
    job = await submit_and_claim(services)
    started = time.monotonic()
    await run_job(services, job, worker_id="w1")
    assert time.monotonic() - started < 0.3 * 2.5, "four 0.3 s variants must overlap"


async def test_one_variant_failing_leaves_three_and_done(make_services: Any) -> None:
    generator = ScriptedGenerator({2: ProviderRejected("nanobana", "task failed to generate")})
    services = await make_services(generator=generator)
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.DONE
    assert len(product.generated_image_urls) == 3
    velvet = product.variant(2)
    assert velvet.status == VariantStatus.FAILED and "failed to generate" in (velvet.error or "")
    # Labels come from `variants`: the failed one shifted the URL list.
    assert product.generated_image_urls == [v.url for v in product.variants if v.status == VariantStatus.DONE]
    assert product.generated_image_urls[1] == product.variant(3).url


async def test_all_variants_failing_permanently_fails_the_job_with_reasons(make_services: Any) -> None:
    failing = {i: ProviderRejected("nanobana", f"refused {i}") for i in (1, 2, 3, 4)}
    services = await make_services(generator=ScriptedGenerator(failing))
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.FAILED
    assert product.generated_image_urls == []
    assert product.error is not None and "refused 1" in product.error and "Charcoal" in product.error
    assert product.image_url == product.raw_image_url


async def test_all_variants_failing_transiently_is_raised_for_a_retry(make_services: Any) -> None:
    failing = {i: ProviderUnavailable("nanobana", "503") for i in (1, 2, 3, 4)}
    services = await make_services(generator=ScriptedGenerator(failing))
    job = await submit_and_claim(services)
    with pytest.raises(ProviderUnavailable):
        await run_job(services, job, worker_id="w1")
    stored = await services.store.get_product(job.id)
    assert stored is not None and stored.status == JobStatus.PROCESSING, "the worker decides what happens next"


async def test_permanent_cutout_failure_fails_the_job(make_services: Any) -> None:
    remover = ScriptedRemover(fail=ProviderRejected("reve", "the image was refused as a content violation"))
    generator = ScriptedGenerator()
    services = await make_services(remover=remover, generator=generator)
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.FAILED
    assert "content violation" in (product.error or "")
    assert generator.calls == []


async def test_a_retrigger_without_a_new_photo_reuses_the_cutout(make_services: Any) -> None:
    remover = ScriptedRemover()
    services = await make_services(remover=remover)
    job = await submit_and_claim(services)
    first = await run_job(services, job, worker_id="w1")
    await resubmit_product(services, job.id, upload=None)
    again = await services.store.claim_next_job(worker_id="w1", lease_s=60)
    assert again is not None
    second = await run_job(services, again, worker_id="w1")
    assert remover.calls == 1
    assert second.status == JobStatus.DONE and second.cutout_url == first.cutout_url

    # A new photo is a new cut-out, and its URL changes with its content.
    await resubmit_product(services, job.id, upload=ring_photo(300))
    third_job = await services.store.claim_next_job(worker_id="w1", lease_s=60)
    assert third_job is not None
    third = await run_job(services, third_job, worker_id="w1")
    assert remover.calls == 2
    assert third.raw_image_url != first.raw_image_url and third.cutout_url != first.cutout_url


async def test_a_transient_variant_failure_keeps_its_billed_task_id(make_services: Any) -> None:
    generator = ScriptedGenerator(
        {3: [ProviderUnavailable("nanobana", "poll kept failing")], 4: [ProviderUnavailable("nanobana", "busy")]},
        task_ids=True,
    )
    services = await make_services(generator=generator)
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.DONE and len(product.generated_image_urls) == 2
    assert product.variant(3).task_id is not None, "a transient failure keeps its billed task for the next try"


async def test_resume_after_a_crash_polls_saved_tasks_and_keeps_done_variants(make_services: Any) -> None:
    generator = ScriptedGenerator(task_ids=True)
    services = await make_services(generator=generator)
    job = await submit_and_claim(services)
    # A previous worker finished variant 1 and submitted variant 2, then died.
    v1 = job.variant(1).model_copy(update={"status": VariantStatus.DONE, "url": "http://testserver/old_v1.png"})
    v2 = job.variant(2).model_copy(update={"status": VariantStatus.PROCESSING, "task_id": "task-saved"})
    await services.store.set_variant(job.id, worker_id="w1", variant=v1)
    job = await services.store.set_variant(job.id, worker_id="w1", variant=v2)

    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.DONE
    assert sorted(generator.calls) == [(2, "task-saved"), (3, None), (4, None)]
    assert sorted(generator.submitted) == [3, 4]
    assert product.generated_image_urls[0] == "http://testserver/old_v1.png"


async def test_storage_fault_during_a_variant_upload_is_recorded_on_that_variant(make_services: Any) -> None:
    services = await make_services()
    original = services.images.upload

    async def flaky_upload(bucket: str, path: str, data: bytes, *, content_type: str) -> str:
        if path.endswith("_v2.png"):
            raise StorageError("disk full", transient=False)
        return await original(bucket, path, data, content_type=content_type)

    object.__setattr__(services.images, "upload", flaky_upload)
    job = await submit_and_claim(services)
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.DONE and len(product.generated_image_urls) == 3
    assert "disk full" in (product.variant(2).error or "")


async def test_missing_raw_photo_fails_with_a_plain_reason(make_services: Any) -> None:
    services = await make_services()
    job = await submit_and_claim(services)
    await services.images.delete(services.layout.raw_bucket, [services.layout.raw_path(job.id)])
    product = await run_job(services, job, worker_id="w1")
    assert product.status == JobStatus.FAILED and "upload it again" in (product.error or "")


async def test_bad_upload_stores_nothing(make_services: Any) -> None:
    services = await make_services()
    with pytest.raises(UnsupportedImage):
        await submit_product(services, upload=b"not an image at all", title="x", jewellery_type=None)
    assert await services.store.list_products(limit=10, offset=0) == []
    assert not any(p.is_file() for p in (services.settings.data_dir / "storage").rglob("*"))


async def test_failed_insert_removes_the_stored_photo(make_services: Any) -> None:
    services = await make_services()

    async def broken_create(**_kwargs: Any) -> Product:
        raise asyncio.CancelledError  # the client went away mid-request

    object.__setattr__(services.store, "create_product", broken_create)
    with pytest.raises(asyncio.CancelledError):
        await submit_product(services, upload=jpeg_bytes(), title="x", jewellery_type=None)
    assert not any(p.is_file() for p in (services.settings.data_dir / "storage").rglob("*"))


async def test_resubmit_refuses_unknown_and_running_products(make_services: Any) -> None:
    services = await make_services()
    job = await submit_and_claim(services)
    with pytest.raises(JobRunning):
        await resubmit_product(services, job.id, upload=jpeg_bytes())
    from uuid import uuid4

    with pytest.raises(ProductNotFound):
        await resubmit_product(services, uuid4(), upload=None)
