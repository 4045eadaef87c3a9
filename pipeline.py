"""One product's run, and how a product enters the queue.

A run: read the raw photo, get the cut-out (reused when it was made from the same bytes), render the four
variants concurrently (each recorded the moment it lands), make the marketplace image, then finish the row:
``done`` when at least one variant succeeded, else ``failed`` with the reasons. Transient trouble (a provider
that stays unavailable, storage or database faults) is raised to the worker, which hands the job back to the
queue; everything a run finished is kept for the next attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID, uuid4

import structlog

import images
from ai_clients import BackgroundRemover, VariantGenerator, VariantRequest
from config import Backends, Settings, VariantSpec
from database import JobStatus, Product, ProductStore, VariantState, VariantStatus
from errors import JobRunning, LeaseLost, ProductNotFound, ProviderError, StorageError
from storage import ImageStore

log = structlog.get_logger(__name__)

MarketplaceRenderer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Layout:
    """The seed's storage layout."""

    raw_bucket: str
    raw_folder: str
    processed_bucket: str
    processed_folder: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Layout:
        return cls(
            raw_bucket=settings.raw_bucket_name,
            raw_folder=settings.raw_storage_folder.strip("/"),
            processed_bucket=settings.processed_bucket_name,
            processed_folder=settings.processed_storage_folder.strip("/"),
        )

    @property
    def buckets(self) -> set[str]:
        return {self.raw_bucket, self.processed_bucket}

    def raw_path(self, product_id: UUID) -> str:
        return f"{self.raw_folder}/{product_id}.jpg"

    def cutout_path(self, product_id: UUID) -> str:
        return f"products/temp/reve_{product_id}.png"

    def variant_path(self, product_id: UUID, index: int) -> str:
        return f"{self.processed_folder}/{product_id}_v{index}.png"

    def marketplace_path(self, product_id: UUID) -> str:
        return f"{self.processed_folder}/{product_id}_marketplace.jpg"


class JobSignal:
    """Wakes the worker when a job is queued, so it starts at once rather than on its next poll."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout=timeout_s)
        except TimeoutError:
            return
        finally:
            self._event.clear()


@dataclass(frozen=True)
class Services:
    """Everything the entry point built; passed to routes, the pipeline and the worker."""

    settings: Settings
    backends: Backends
    store: ProductStore
    images: ImageStore
    remover: BackgroundRemover
    generator: VariantGenerator
    render_marketplace: MarketplaceRenderer
    layout: Layout
    variant_specs: tuple[VariantSpec, ...]
    job_signal: JobSignal = field(default_factory=JobSignal)


def versioned(url: str, data: bytes) -> str:
    """Add a content version to a URL: a re-run that changes a file changes its URL, so CDNs never serve stale."""
    return f"{url}{'&' if '?' in url else '?'}v={hashlib.sha256(data).hexdigest()[:12]}"


def initial_variants(specs: Sequence[VariantSpec]) -> list[VariantState]:
    return [VariantState(index=s.index, key=s.key, label=s.label) for s in specs]


# ---------------------------------------------------------------------------------------------------------------------
# Intake


async def _store_raw(services: Services, product_id: UUID, upload: bytes) -> str:
    settings = services.settings
    normalised = await asyncio.to_thread(images.normalise_upload, upload, max_pixels=settings.max_image_pixels)
    layout = services.layout
    url = await services.images.upload(
        layout.raw_bucket, layout.raw_path(product_id), normalised.jpeg, content_type="image/jpeg"
    )
    return versioned(url, normalised.jpeg)


async def submit_product(services: Services, *, upload: bytes, title: str, jewellery_type: str | None) -> Product:
    """Validate and store a new photo, create its row as a pending job, and wake the worker.

    Bad input raises an `InputError` before anything is stored; a failed insert removes the stored photo.
    """
    product_id = uuid4()
    raw_url = await _store_raw(services, product_id, upload)
    try:
        product = await services.store.create_product(
            product_id=product_id,
            title=title,
            jewellery_type=jewellery_type,
            raw_image_url=raw_url,
            variants=initial_variants(services.variant_specs),
        )
    except BaseException:
        await services.images.delete(services.layout.raw_bucket, [services.layout.raw_path(product_id)])
        raise
    services.job_signal.notify()
    log.info("product_queued", product_id=str(product_id))
    return product


async def resubmit_product(services: Services, product_id: UUID, *, upload: bytes | None) -> Product:
    """Queue a product again, optionally with a new photo. Raises `ProductNotFound` or `JobRunning` (409)."""
    current = await services.store.get_product(product_id)
    if current is None:
        raise ProductNotFound(str(product_id))
    if current.status == JobStatus.PROCESSING:
        raise JobRunning(str(product_id))
    raw_url = await _store_raw(services, product_id, upload) if upload is not None else None
    product = await services.store.requeue_product(
        product_id, variants=initial_variants(services.variant_specs), raw_image_url=raw_url
    )
    services.job_signal.notify()
    log.info("product_requeued", product_id=str(product_id), new_photo=upload is not None)
    return product


# ---------------------------------------------------------------------------------------------------------------------
# A run


@dataclass
class _Run:
    services: Services
    job: Product
    worker_id: str

    @property
    def id(self) -> UUID:
        return self.job.id

    async def set_variant(self, variant: VariantState) -> VariantState:
        # The returned row is not kept: concurrent variants' answers can arrive out of order, so a row from one
        # of them may predate another's write. Each variant tracks its own state; `_finish` re-reads the row.
        await self.services.store.set_variant(self.id, worker_id=self.worker_id, variant=variant)
        return variant


async def run_job(services: Services, job: Product, *, worker_id: str) -> Product:
    """Take a claimed job to ``done`` or ``failed`` and return the final row.

    Raises a retryable `ServiceError` when the job should be handed back to the queue, and `LeaseLost` when
    another worker owns it now.
    """
    run = _Run(services=services, job=job, worker_id=worker_id)
    started = time.monotonic()
    layout = services.layout
    try:
        raw = await services.images.download(layout.raw_bucket, layout.raw_path(job.id))
    except StorageError as exc:
        if exc.not_found:
            return await _finish(run, error="the uploaded photo is missing from storage; upload it again")
        raise
    try:
        cutout_png, cutout_url = await _cutout(run, raw)
    except ProviderError as exc:
        if exc.retryable:
            raise
        return await _finish(run, error=f"background removal failed: {exc}")

    # A resumed job skips the variants an earlier attempt finished. Provider and storage failures of one variant
    # are recorded on it and never cancel the others; a lost lease or a database fault stops them all.
    pending = [spec for spec in services.variant_specs if run.job.variant(spec.index).status != VariantStatus.DONE]
    try:
        async with asyncio.TaskGroup() as group:
            marketplace = group.create_task(_marketplace(run, cutout_png))
            variants = [group.create_task(_variant(run, spec, cutout_png, cutout_url)) for spec in pending]
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    marketplace_url = marketplace.result()
    failures = [exc for exc in (task.result() for task in variants) if exc is not None]
    run.job = await _reread(run)
    if not any(v.status == VariantStatus.DONE for v in run.job.variants):
        retryable = [exc for exc in failures if exc.retryable]
        if retryable:
            raise retryable[0]
    product = await _finish(run, marketplace_url=marketplace_url)
    log.info(
        "job_finished",
        status=product.status.value,
        variants_done=len(product.generated_image_urls),
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return product


async def _cutout(run: _Run, raw: bytes) -> tuple[bytes, str]:
    """The cut-out's PNG and URL: the stored one when it was made from these exact raw bytes, else a new one."""
    services, job, layout = run.services, run.job, run.services.layout
    raw_sha256 = hashlib.sha256(raw).hexdigest()
    path = layout.cutout_path(job.id)
    if job.raw_sha256 == raw_sha256 and job.cutout_url:
        try:
            png = await services.images.download(layout.processed_bucket, path)
            log.info("cutout_reused")
            return png, job.cutout_url
        except StorageError as exc:
            if not exc.not_found:
                raise
    started = time.monotonic()
    result = await services.remover.remove_background(raw)
    png = await asyncio.to_thread(
        images.cutout_to_png,
        result.image,
        provider=services.remover.name,
        max_pixels=services.settings.max_image_pixels,
    )
    url = versioned(await services.images.upload(layout.processed_bucket, path, png, content_type="image/png"), png)
    run.job = await services.store.update_job(
        job.id,
        worker_id=run.worker_id,
        fields={"cutout_url": url, "raw_sha256": raw_sha256, "cutout_confidence": result.confidence},
    )
    log.info("cutout_done", remover=services.remover.name, confidence=result.confidence,
             elapsed_ms=round((time.monotonic() - started) * 1000))
    return png, url


async def _variant(
    run: _Run, spec: VariantSpec, cutout_png: bytes, cutout_url: str
) -> ProviderError | StorageError | None:
    """Render, store and record one variant. Returns its error rather than raising, so siblings run on."""
    services = run.services
    state = run.job.variant(spec.index)
    started = time.monotonic()
    try:
        state = await run.set_variant(state.model_copy(update={"status": VariantStatus.PROCESSING, "error": None}))

        async def on_submitted(task_id: str) -> None:
            nonlocal state
            state = await run.set_variant(state.model_copy(update={"task_id": task_id}))

        request = VariantRequest(product_id=str(run.id), spec=spec, cutout_png=cutout_png, cutout_url=cutout_url)
        result = await services.generator.generate(request, task_id=state.task_id, on_submitted=on_submitted)
        png = await asyncio.to_thread(
            images.result_to_png, result, provider=services.generator.name,
            max_pixels=services.settings.max_image_pixels,
        )
        url = await services.images.upload(
            services.layout.processed_bucket, services.layout.variant_path(run.id, spec.index), png,
            content_type="image/png",
        )
        await run.set_variant(state.model_copy(update={"status": VariantStatus.DONE, "url": versioned(url, png)}))
        log.info("variant_done", variant=spec.index, elapsed_ms=round((time.monotonic() - started) * 1000))
        return None
    except (ProviderError, StorageError) as exc:
        # Keep the task id only when polling it again may still succeed; a task that failed is never re-polled.
        task_id = state.task_id if exc.retryable else None
        await run.set_variant(
            state.model_copy(update={"status": VariantStatus.FAILED, "error": str(exc), "task_id": task_id})
        )
        log.warning("variant_failed", variant=spec.index, error=str(exc), retryable=exc.retryable)
        return exc


async def _marketplace(run: _Run, cutout_png: bytes) -> str | None:
    """The white marketplace image. Local and free; its failure is logged, never fatal to the job."""
    services, layout = run.services, run.services.layout
    try:
        jpeg = await asyncio.to_thread(services.render_marketplace, cutout_png)
        url = await services.images.upload(
            layout.processed_bucket, layout.marketplace_path(run.id), jpeg, content_type="image/jpeg"
        )
    except Exception as exc:  # a bonus image: whatever went wrong, the job goes on
        log.exception("marketplace_failed", error=str(exc))
        return None
    return versioned(url, jpeg)


async def _reread(run: _Run) -> Product:
    product = await run.services.store.get_product(run.id)
    if product is None:  # deleted under us: nothing left to write to
        raise LeaseLost(str(run.id), run.worker_id)
    return product


async def _finish(run: _Run, *, error: str | None = None, marketplace_url: str | None = None) -> Product:
    """Write the end state once: the successful URLs in variant order, or ``failed`` with the reasons."""
    done = [v for v in run.job.variants if v.status == VariantStatus.DONE and v.url]
    urls = [v.url for v in done if v.url]
    if error is None and not urls:
        reasons = "; ".join(f"{v.label}: {v.error}" for v in run.job.variants if v.error) or "no variant succeeded"
        error = f"no styled image could be made ({reasons})"
    fields: dict[str, object] = {
        "status": JobStatus.DONE if urls else JobStatus.FAILED,
        "error": None if urls else error,
        "generated_image_urls": urls,
        "image_url": urls[0] if urls else run.job.raw_image_url,
        "marketplace_image_url": marketplace_url,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    return await run.services.store.update_job(run.id, worker_id=run.worker_id, fields=fields)
