"""The worker: claims pending jobs, runs them under a lease with heartbeats, recovers jobs of dead workers, and
stops gracefully. It runs inside the API process by default; ``python worker.py`` runs workers without HTTP.

Also home of `open_services`, the wiring from settings to `Services` that both entry points use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from uuid import UUID, uuid4

import httpx
import structlog
from supabase import AsyncClient, AsyncClientOptions, acreate_client

import studio
from ai_clients import BackgroundRemover, NanobanaClient, ReveClient, VariantGenerator
from config import Settings
from database import Product, ProductStore, SqliteStore, SupabaseStore
from errors import LeaseLost, ServiceError
from logging_config import configure_logging
from pipeline import JobSignal, Layout, Services, run_job
from retrying import RetryPolicy
from storage import ImageStore, LocalImageStore, SupabaseImageStore

log = structlog.get_logger(__name__)

# Idle pooled connections are dropped after this long: well under the idle timeouts of the servers and proxies in
# front of Supabase and the providers (uvicorn 5 s, nginx 75 s, cloud load balancers 60 s), so a request never goes
# out on a connection the server is closing at that moment ("Server disconnected without sending a response").
KEEPALIVE_EXPIRY_S = 2.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:6]}"


class Worker:
    """Runs up to ``concurrency`` jobs at once from the product store.

    ``run()`` loops until ``stop()``; ``run_once()`` drains what is claimable now and returns (for tests and
    cron-style use). Every job runs under a lease that a heartbeat extends; a job whose lease is lost is
    cancelled without writing anything more.
    """

    def __init__(
        self,
        *,
        services: Services,
        worker_id: str | None = None,
        concurrency: int = 4,
        lease_s: float = 60.0,
        poll_interval_s: float = 2.0,
        job_timeout_s: float = 300.0,
        max_attempts: int = 3,
        retry_backoff_s: float = 15.0,
        grace_s: float = 20.0,
    ) -> None:
        self.services = services
        self.worker_id = worker_id or default_worker_id()
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._job_timeout_s = job_timeout_s
        self._max_attempts = max_attempts
        self._retry_backoff_s = retry_backoff_s
        self._grace_s = grace_s
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        self._lost: set[UUID] = set()
        self._stopping = asyncio.Event()
        self._last_recovery = 0.0

    @classmethod
    def from_settings(cls, services: Services, **overrides: object) -> Worker:
        s = services.settings
        options: dict[str, object] = {
            "concurrency": s.worker_concurrency,
            "lease_s": s.job_lease_seconds,
            "poll_interval_s": s.worker_poll_interval_seconds,
            "job_timeout_s": s.processing_timeout_seconds,
            "max_attempts": s.job_max_attempts,
            "grace_s": s.shutdown_grace_seconds,
            **overrides,
        }
        return cls(services=services, **options)  # type: ignore[arg-type]

    @property
    def running_jobs(self) -> int:
        return len(self._tasks)

    # -- loop ---------------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("worker_started", worker_id=self.worker_id, concurrency=self._concurrency)
        while not self._stopping.is_set():
            try:
                await self._tick()
            except ServiceError as exc:
                # The store is unreachable: keep the jobs we hold, try again after a pause.
                log.warning("worker_tick_failed", error=str(exc))
            await self._wait_for_work()
        log.info("worker_stopped", worker_id=self.worker_id)

    async def _wait_for_work(self) -> None:
        # Woken by a new upload, a finished job (a free slot), stop(), or the poll interval.
        stop = asyncio.ensure_future(self._stopping.wait())
        wake = asyncio.ensure_future(self.services.job_signal.wait(self._poll_interval_s))
        await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        wake.cancel()

    async def run_once(self) -> int:
        """Claim and finish every job that is claimable now; return how many ran."""
        ran = 0
        while True:
            ran += await self._tick()
            if not self._tasks:
                return ran
            await asyncio.wait(set(self._tasks.values()), return_when=asyncio.FIRST_COMPLETED)

    async def _tick(self) -> int:
        """Recover stale jobs now and then, and claim jobs while there is capacity."""
        if time.monotonic() - self._last_recovery >= min(self._lease_s / 2, 30.0):
            self._last_recovery = time.monotonic()
            for product in await self.services.store.recover_stale_jobs(max_attempts=self._max_attempts):
                log.warning("job_recovered", product_id=str(product.id), status=product.status.value,
                            attempts=product.attempts)
        started = 0
        while len(self._tasks) < self._concurrency and not self._stopping.is_set():
            job = await self.services.store.claim_next_job(worker_id=self.worker_id, lease_s=self._lease_s)
            if job is None:
                break
            task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(functools.partial(self._job_ended, job.id))
            started += 1
        return started

    def _job_ended(self, job_id: UUID, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self.services.job_signal.notify()

    # -- one job ------------------------------------------------------------------------------------------------------

    async def _execute(self, job: Product) -> None:
        with structlog.contextvars.bound_contextvars(product_id=str(job.id), worker_id=self.worker_id):
            log.info("job_claimed", attempt=job.attempts)
            heartbeat = asyncio.create_task(self._heartbeat(job.id, asyncio.current_task()))
            try:
                async with asyncio.timeout(self._job_timeout_s):
                    await run_job(self.services, job, worker_id=self.worker_id)
            except LeaseLost:
                log.warning("job_lease_lost")
            except TimeoutError:
                await self._release(job, f"timed out after {self._job_timeout_s:.0f} s")
            except ServiceError as exc:
                await self._release(job, str(exc), retry_after_s=exc.retry_after_s)
            except asyncio.CancelledError:
                if job.id not in self._lost:
                    # Shutdown: hand the job back at once, without counting this attempt against it.
                    await self._release(job, "worker shut down", refund=True)
                raise
            except Exception as exc:  # a bug: log it, and let the attempts limit end the job
                log.exception("job_crashed")
                await self._release(job, f"internal error: {type(exc).__name__}")
            finally:
                heartbeat.cancel()
                self._lost.discard(job.id)

    async def _heartbeat(self, job_id: UUID, job_task: asyncio.Task[object] | None) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                held = await self.services.store.heartbeat(job_id, worker_id=self.worker_id, lease_s=self._lease_s)
            except ServiceError as exc:
                log.warning("heartbeat_failed", error=str(exc))
                continue
            if not held and job_task is not None:
                log.warning("job_lease_lost")
                self._lost.add(job_id)
                job_task.cancel()
                return

    async def _release(
        self, job: Product, error: str, *, retry_after_s: float | None = None, refund: bool = False
    ) -> None:
        backoff = 0.0 if refund else retry_after_s or self._retry_backoff_s * 2 ** max(job.attempts - 1, 0)
        try:
            product = await self.services.store.release_job(
                job.id,
                worker_id=self.worker_id,
                error=error,
                retry_in_s=min(backoff, 600.0),
                max_attempts=self._max_attempts,
                refund_attempt=refund,
            )
        except ServiceError as exc:
            # The lease will expire and recovery will hand the job on: nothing is lost.
            log.error("job_release_failed", error=str(exc))
            return
        if product is not None:
            log.warning("job_released", status=product.status.value, error=error, retry_in_s=round(backoff, 1))

    # -- stopping -----------------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop claiming; give running jobs ``grace_s`` to finish, then hand the rest back to the queue."""
        self._stopping.set()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        log.info("worker_draining", running=len(tasks), grace_s=self._grace_s)
        _, unfinished = await asyncio.wait(tasks, timeout=self._grace_s)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)


# ---------------------------------------------------------------------------------------------------------------------
# Wiring


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(attempts=settings.max_retries + 1, wait_max_s=settings.retry_wait_max_seconds)


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    supabase_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Services]:
    """Build every service the settings ask for; close them in reverse order on exit.

    ``transport`` and ``supabase_transport`` let tests route the providers' and Supabase's HTTP.
    """
    backends = settings.resolve_backends()
    layout = Layout.from_settings(settings)
    retry = retry_policy(settings)
    async with AsyncExitStack() as stack:
        http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )
        stack.push_async_callback(http.aclose)

        supabase: AsyncClient | None = None
        if "supabase" in (backends.database, backends.storage):
            assert settings.supabase_url and settings.supabase_service_role_key
            # HTTP/1.1: idle HTTP/2 connections to Supabase can drop ("Server disconnected").
            supabase_http = httpx.AsyncClient(
                transport=supabase_transport,
                timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
                limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
            )
            stack.push_async_callback(supabase_http.aclose)
            supabase = await acreate_client(
                settings.supabase_url,
                settings.supabase_service_role_key.get_secret_value(),
                options=AsyncClientOptions(httpx_client=supabase_http),
            )

        store: ProductStore
        if backends.database == "supabase":
            assert supabase is not None
            store = SupabaseStore(client=supabase, table=settings.db_table_name)
        else:
            store = SqliteStore(path=settings.data_dir / "products.db", table=settings.db_table_name)
        stack.push_async_callback(store.aclose)

        image_store: ImageStore
        if backends.storage == "supabase":
            assert supabase is not None and settings.supabase_url
            image_store = SupabaseImageStore(client=supabase, supabase_url=settings.supabase_url, retry=retry)
        else:
            image_store = LocalImageStore(root=settings.data_dir / "storage", public_base_url=settings.public_base_url)
        await image_store.ensure_buckets(layout.buckets)

        studio_limiter = asyncio.Semaphore(settings.studio_concurrency)
        remover: BackgroundRemover
        if backends.background_remover == "reve":
            assert settings.reve_api_key is not None
            remover = ReveClient(
                http=http,
                api_key=settings.reve_api_key,
                base_url=settings.reve_base_url,
                prompt=settings.reve_prompt,
                version=settings.reve_version,
                retry=retry,
                limiter=asyncio.Semaphore(settings.reve_concurrency),
                timeout_s=settings.reve_timeout_seconds,
            )
        else:
            remover = studio.LocalBackgroundRemover(limiter=studio_limiter)

        generator: VariantGenerator
        if backends.variant_generator == "nanobana":
            assert settings.nanobana_api_key is not None
            generator = NanobanaClient(
                http=http,
                api_key=settings.nanobana_api_key,
                base_url=settings.nanobana_base_url,
                callback_url=settings.nanobana_callback_url or f"{settings.public_base_url}/callbacks/nanobanana",
                retry=retry,
                limiter=asyncio.Semaphore(settings.nanobana_concurrency),
                poll_interval_s=settings.nanobana_poll_interval_seconds,
                deadline_s=settings.nanobana_deadline_seconds,
                timeout_s=settings.http_timeout_seconds,
                max_download_bytes=settings.max_download_bytes,
                https_only_downloads=settings.is_production,
            )
        else:
            generator = studio.LocalVariantGenerator(limiter=studio_limiter)

        yield Services(
            settings=settings,
            backends=backends,
            store=store,
            images=image_store,
            remover=remover,
            generator=generator,
            render_marketplace=studio.render_marketplace_jpeg,
            layout=layout,
            variant_specs=settings.variant_specs(),
            job_signal=JobSignal(),
        )


def configure_from(settings: Settings) -> None:
    configure_logging(
        level=settings.log_level,
        json_logs=settings.environment in ("production", "staging"),
        secrets=settings.secret_values(),
    )


async def serve_worker(settings: Settings) -> None:
    """``python worker.py``: run a worker until SIGINT/SIGTERM, then drain it."""
    async with open_services(settings) as services:
        worker = Worker.from_settings(services)
        log.info("backends", **vars(services.backends))
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested.set)
        runner = asyncio.create_task(worker.run())
        await stop_requested.wait()
        await worker.stop()
        await runner


def main() -> None:
    settings = Settings()
    configure_from(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_worker(settings))


if __name__ == "__main__":
    main()
