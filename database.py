"""Product rows, which are also the jobs: the `ProductStore` protocol, its model, and two implementations.

`SupabaseStore` talks to Supabase Postgres through supabase-py; its state changes are the SQL functions of
`migrations/002_job_functions.sql`, called with `rpc`. `SqliteStore` keeps the same rows and semantics in a file
for the embedded mode, with every state change one statement inside a single-writer transaction. Both return
`Product` models, never raw rows.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

import httpx
from postgrest import APIError
from pydantic import BaseModel, Field, field_validator
from supabase import AsyncClient

from errors import DatabaseError, JobRunning, LeaseLost, ProductNotFound
from retrying import RetryPolicy

T = TypeVar("T")


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class VariantStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class VariantState(BaseModel):
    """One entry of the row's ``variants``: what the frontend reads to label each styled shot."""

    index: int = Field(ge=1, le=4, examples=[1])
    key: str = Field(examples=["stone"])
    label: str = Field(examples=["Stone — Classic"])
    status: VariantStatus = VariantStatus.PENDING
    url: str | None = Field(None, examples=["https://…/products/processed/3f0c…_v1.png?v=9a1b2c3d4e5f"])
    error: str | None = None
    # The provider's task id, saved as soon as it is billed, so a resumed job polls instead of paying again.
    task_id: str | None = None


class Product(BaseModel):
    """The product row as stored and as served by ``GET /product/{id}``."""

    id: UUID
    title: str
    jewellery_type: str | None = None
    image_url: str | None = None
    generated_image_urls: list[str] = []
    created_at: datetime
    updated_at: datetime
    status: JobStatus
    attempts: int = 0
    error: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    run_after: datetime | None = None
    raw_image_url: str | None = None
    cutout_url: str | None = None
    raw_sha256: str | None = None
    cutout_confidence: float | None = None
    marketplace_image_url: str | None = None
    variants: list[VariantState] = []

    @field_validator("generated_image_urls", "variants", mode="before")
    @classmethod
    def _decode_json(cls, value: Any) -> Any:
        # SQLite hands JSON columns back as text; PostgREST as parsed JSON.
        return json.loads(value) if isinstance(value, str) else ([] if value is None else value)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Product:
        return cls.model_validate(dict(row))

    def variant(self, index: int) -> VariantState:
        return next(v for v in self.variants if v.index == index)


# Columns a worker may set with `update_job`; everything else changes only through the state functions.
JOB_FIELDS = frozenset(
    {"raw_sha256", "cutout_url", "cutout_confidence", "image_url", "generated_image_urls", "marketplace_image_url",
     "status", "error", "lease_owner", "lease_expires_at"}
)


class ProductStore(Protocol):
    """Rows and job state. Worker writes are conditional on holding the lease and raise `LeaseLost` otherwise."""

    name: str

    async def create_product(
        self,
        *,
        product_id: UUID,
        title: str,
        jewellery_type: str | None,
        raw_image_url: str,
        variants: Sequence[VariantState],
    ) -> Product: ...

    async def get_product(self, product_id: UUID) -> Product | None: ...

    async def list_products(self, *, limit: int, offset: int) -> list[Product]: ...

    async def requeue_product(
        self, product_id: UUID, *, variants: Sequence[VariantState], raw_image_url: str | None = None
    ) -> Product:
        """Queue a product again. Raises `ProductNotFound`, or `JobRunning` when it is processing."""
        ...

    async def claim_next_job(self, *, worker_id: str, lease_s: float) -> Product | None: ...

    async def heartbeat(self, product_id: UUID, *, worker_id: str, lease_s: float) -> bool: ...

    async def set_variant(self, product_id: UUID, *, worker_id: str, variant: VariantState) -> Product: ...

    async def update_job(self, product_id: UUID, *, worker_id: str, fields: Mapping[str, Any]) -> Product: ...

    async def release_job(
        self,
        product_id: UUID,
        *,
        worker_id: str,
        error: str,
        retry_in_s: float,
        max_attempts: int,
        refund_attempt: bool = False,
    ) -> Product | None:
        """Back to ``pending`` while attempts remain (else done/failed); None when the lease was already lost."""
        ...

    async def recover_stale_jobs(self, *, max_attempts: int) -> list[Product]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def _variants_json(variants: Sequence[VariantState]) -> list[dict[str, Any]]:
    return [v.model_dump(mode="json") for v in variants]


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - JOB_FIELDS
    if unknown:
        raise ValueError(f"not a job field: {sorted(unknown)}")
    return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Supabase (PostgREST through supabase-py)


# RPCs that are safe to repeat get a few quick retries (a blip, a dropped keep-alive connection); a longer outage
# is the worker's to ride out (the job is released and retried later, or its lease expires).
IDEMPOTENT_RETRY = RetryPolicy(attempts=3, wait_initial_s=0.1, wait_max_s=1.0, total_s=5.0)


class SupabaseStore:
    """Rows in Supabase Postgres. Needs the schema and functions of `migrations/`."""

    name = "supabase"

    def __init__(self, *, client: AsyncClient, table: str = "products", retry: RetryPolicy = IDEMPOTENT_RETRY) -> None:
        self._client = client
        self._table = table
        self._retry = retry

    async def _run(self, what: str, query: Any, *, idempotent: bool = False) -> list[dict[str, Any]]:
        """Execute one PostgREST request. postgrest-py repeats reads (GET) itself when the connection fails; the
        ``idempotent`` RPCs (POST: a heartbeat, setting a variant to a given value) are repeated here a few times
        within seconds: an idle keep-alive connection closed by a proxy as the request went out is routine, and must
        not cost a job an attempt. Claims and releases are never repeated: a lost response there is recovered by the
        lease expiring."""
        if idempotent:
            return await self._retry.run(lambda: self._run(what, query))
        try:
            response = await query.execute()
        except APIError as exc:
            raise DatabaseError(f"{what}: {exc.code} {exc.message}") from exc
        except httpx.HTTPError as exc:
            raise DatabaseError(f"{what}: {type(exc).__name__}") from exc
        if response is None:  # maybe_single() with no row
            return []
        data = response.data
        return [data] if isinstance(data, dict) else list(data or [])

    async def _rpc(self, fn: str, params: dict[str, Any], *, idempotent: bool = False) -> list[Product]:
        rows = await self._run(fn, self._client.rpc(fn, params), idempotent=idempotent)
        return [Product.from_row(row) for row in rows]

    async def create_product(
        self,
        *,
        product_id: UUID,
        title: str,
        jewellery_type: str | None,
        raw_image_url: str,
        variants: Sequence[VariantState],
    ) -> Product:
        row = {
            "id": str(product_id),
            "title": title,
            "jewellery_type": jewellery_type,
            "raw_image_url": raw_image_url,
            "image_url": raw_image_url,
            "status": JobStatus.PENDING.value,
            "variants": _variants_json(variants),
        }
        rows = await self._run("create_product", self._client.table(self._table).insert(row))
        return Product.from_row(rows[0])

    async def get_product(self, product_id: UUID) -> Product | None:
        query = self._client.table(self._table).select("*").eq("id", str(product_id)).maybe_single()
        rows = await self._run("get_product", query)
        return Product.from_row(rows[0]) if rows else None

    async def list_products(self, *, limit: int, offset: int) -> list[Product]:
        query = (
            self._client.table(self._table)
            .select("*")
            .order("created_at", desc=True)
            .order("id")
            .range(offset, offset + limit - 1)
        )
        return [Product.from_row(row) for row in await self._run("list_products", query)]

    async def requeue_product(
        self, product_id: UUID, *, variants: Sequence[VariantState], raw_image_url: str | None = None
    ) -> Product:
        params = {"p_id": str(product_id), "p_variants": _variants_json(variants), "p_raw_image_url": raw_image_url}
        rows = await self._rpc("requeue_job", params)
        if rows:
            return rows[0]
        if await self.get_product(product_id) is None:
            raise ProductNotFound(str(product_id))
        raise JobRunning(str(product_id))

    async def claim_next_job(self, *, worker_id: str, lease_s: float) -> Product | None:
        rows = await self._rpc("claim_next_job", {"p_worker": worker_id, "p_lease_seconds": lease_s})
        return rows[0] if rows else None

    async def heartbeat(self, product_id: UUID, *, worker_id: str, lease_s: float) -> bool:
        params = {"p_id": str(product_id), "p_worker": worker_id, "p_lease_seconds": lease_s}
        return bool(await self._rpc("heartbeat_job", params, idempotent=True))

    async def set_variant(self, product_id: UUID, *, worker_id: str, variant: VariantState) -> Product:
        params = {"p_id": str(product_id), "p_worker": worker_id, "p_variant": variant.model_dump(mode="json")}
        rows = await self._rpc("set_job_variant", params, idempotent=True)
        if not rows:
            raise LeaseLost(str(product_id), worker_id)
        return rows[0]

    async def update_job(self, product_id: UUID, *, worker_id: str, fields: Mapping[str, Any]) -> Product:
        query = (
            self._client.table(self._table)
            .update(_check_fields(fields))
            .eq("id", str(product_id))
            .eq("lease_owner", worker_id)
            .eq("status", JobStatus.PROCESSING.value)
        )
        rows = await self._run("update_job", query)
        if not rows:
            raise LeaseLost(str(product_id), worker_id)
        return Product.from_row(rows[0])

    async def release_job(
        self,
        product_id: UUID,
        *,
        worker_id: str,
        error: str,
        retry_in_s: float,
        max_attempts: int,
        refund_attempt: bool = False,
    ) -> Product | None:
        params = {
            "p_id": str(product_id),
            "p_worker": worker_id,
            "p_error": error,
            "p_retry_in_seconds": retry_in_s,
            "p_max_attempts": max_attempts,
            "p_refund": refund_attempt,
        }
        rows = await self._rpc("release_job", params)
        return rows[0] if rows else None

    async def recover_stale_jobs(self, *, max_attempts: int) -> list[Product]:
        return await self._rpc("recover_stale_jobs", {"p_max_attempts": max_attempts})

    async def ping(self) -> None:
        await self._run("ping", self._client.table(self._table).select("id").limit(1))

    async def aclose(self) -> None:
        # supabase-py's AsyncClient has no aclose(); the injected httpx client is closed by its owner.
        return None


# ---------------------------------------------------------------------------------------------------------------------
# SQLite (embedded mode)

_SQLITE_SCHEMA = """
create table if not exists {table} (
  id text primary key,
  title text not null default 'Untitled',
  jewellery_type text,
  image_url text,
  generated_image_urls text not null default '[]',
  created_at text not null,
  updated_at text not null,
  status text not null default 'pending' check (status in ('pending', 'processing', 'done', 'failed')),
  attempts integer not null default 0,
  error text,
  lease_owner text,
  lease_expires_at text,
  run_after text not null,
  raw_image_url text,
  cutout_url text,
  raw_sha256 text,
  cutout_confidence real,
  marketplace_image_url text,
  variants text not null default '[]'
);
create index if not exists {table}_pending_queue_idx on {table} (run_after, created_at) where status = 'pending';
create index if not exists {table}_processing_lease_idx on {table} (lease_expires_at) where status = 'processing';
create index if not exists {table}_created_at_idx on {table} (created_at desc);
"""


def _stamp(moment: datetime) -> str:
    # One fixed-width format for every timestamp, so text comparison in SQL is time comparison.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SqliteStore:
    """Rows in a SQLite file. One connection, used from worker threads one statement group at a time.

    Several processes on one machine may share the file (WAL mode, ``BEGIN IMMEDIATE`` for every write).
    """

    name = "sqlite"

    def __init__(
        self, *, path: Path, table: str = "products", clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        if not table.isidentifier():
            raise ValueError(f"table name must be an identifier: {table!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._table = table
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = self._connect(path)
        self._conn.execute("pragma journal_mode = wal")
        self._conn.executescript(_SQLITE_SCHEMA.format(table=table))
        # Reads (the frontend polling GET /product) use their own connection: in WAL mode they never wait for a
        # write transaction, and writes never wait for them.
        self._read_lock = threading.Lock()
        self._read_conn = self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("pragma synchronous = normal")
        conn.execute("pragma busy_timeout = 30000")
        return conn

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._read_lock:
                try:
                    return work(self._read_conn)
                except sqlite3.Error as exc:
                    raise DatabaseError(f"sqlite: {exc}") from exc

        return await asyncio.to_thread(run)

    async def _tx(self, work: Callable[[sqlite3.Connection, str], T]) -> T:
        def run() -> T:
            with self._lock:
                try:
                    self._conn.execute("begin immediate")
                    try:
                        result = work(self._conn, _stamp(self._clock()))
                    except BaseException:
                        self._conn.execute("rollback")
                        raise
                    self._conn.execute("commit")
                    return result
                except sqlite3.Error as exc:
                    raise DatabaseError(f"sqlite: {exc}") from exc

        return await asyncio.to_thread(run)

    def _one(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Product | None:
        row = conn.execute(sql.format(t=self._table), params).fetchone()
        return Product.from_row(row) if row is not None else None

    def _after(self, seconds: float) -> str:
        return _stamp(self._clock() + timedelta(seconds=seconds))

    async def create_product(
        self,
        *,
        product_id: UUID,
        title: str,
        jewellery_type: str | None,
        raw_image_url: str,
        variants: Sequence[VariantState],
    ) -> Product:
        def work(conn: sqlite3.Connection, now: str) -> Product:
            product = self._one(
                conn,
                "insert into {t} (id, title, jewellery_type, raw_image_url, image_url, created_at, updated_at, "
                "run_after, variants) values (?, ?, ?, ?, ?, ?, ?, ?, ?) returning *",
                (str(product_id), title, jewellery_type, raw_image_url, raw_image_url, now, now, now,
                 json.dumps(_variants_json(variants))),
            )
            assert product is not None
            return product

        return await self._tx(work)

    async def get_product(self, product_id: UUID) -> Product | None:
        return await self._read(lambda conn: self._one(conn, "select * from {t} where id = ?", (str(product_id),)))

    async def list_products(self, *, limit: int, offset: int) -> list[Product]:
        def work(conn: sqlite3.Connection) -> list[Product]:
            rows = conn.execute(
                f"select * from {self._table} order by created_at desc, id limit ? offset ?", (limit, offset)
            ).fetchall()
            return [Product.from_row(row) for row in rows]

        return await self._read(work)

    async def requeue_product(
        self, product_id: UUID, *, variants: Sequence[VariantState], raw_image_url: str | None = None
    ) -> Product:
        def work(conn: sqlite3.Connection, now: str) -> Product:
            product = self._one(
                conn,
                "update {t} set status = 'pending', attempts = 0, error = null, lease_owner = null, "
                "lease_expires_at = null, run_after = ?, variants = ?, generated_image_urls = '[]', "
                "marketplace_image_url = null, raw_image_url = coalesce(?, raw_image_url), "
                "image_url = coalesce(?, raw_image_url), updated_at = ? "
                "where id = ? and status <> 'processing' returning *",
                (now, json.dumps(_variants_json(variants)), raw_image_url, raw_image_url, now, str(product_id)),
            )
            if product is not None:
                return product
            if self._one(conn, "select * from {t} where id = ?", (str(product_id),)) is None:
                raise ProductNotFound(str(product_id))
            raise JobRunning(str(product_id))

        return await self._tx(work)

    async def claim_next_job(self, *, worker_id: str, lease_s: float) -> Product | None:
        expires = self._after(lease_s)
        return await self._tx(
            lambda conn, now: self._one(
                conn,
                "update {t} set status = 'processing', lease_owner = ?, lease_expires_at = ?, "
                "attempts = attempts + 1, error = null, updated_at = ? "
                "where id = (select id from {t} where status = 'pending' and run_after <= ? "
                "order by run_after, created_at limit 1) returning *",
                (worker_id, expires, now, now),
            )
        )

    async def heartbeat(self, product_id: UUID, *, worker_id: str, lease_s: float) -> bool:
        expires = self._after(lease_s)
        product = await self._tx(
            lambda conn, now: self._one(
                conn,
                "update {t} set lease_expires_at = ?, updated_at = ? "
                "where id = ? and lease_owner = ? and status = 'processing' returning *",
                (expires, now, str(product_id), worker_id),
            )
        )
        return product is not None

    async def set_variant(self, product_id: UUID, *, worker_id: str, variant: VariantState) -> Product:
        product = await self._tx(
            lambda conn, now: self._one(
                conn,
                "update {t} set variants = json_set(variants, ?, json(?)), updated_at = ? "
                "where id = ? and lease_owner = ? and status = 'processing' returning *",
                (f"$[{variant.index - 1}]", variant.model_dump_json(), now, str(product_id), worker_id),
            )
        )
        if product is None:
            raise LeaseLost(str(product_id), worker_id)
        return product

    async def update_job(self, product_id: UUID, *, worker_id: str, fields: Mapping[str, Any]) -> Product:
        values = {
            k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in _check_fields(fields).items()
        }
        assignments = ", ".join(f"{column} = ?" for column in values)
        product = await self._tx(
            lambda conn, now: self._one(
                conn,
                f"update {{t}} set {assignments}, updated_at = ? "
                "where id = ? and lease_owner = ? and status = 'processing' returning *",
                (*values.values(), now, str(product_id), worker_id),
            )
        )
        if product is None:
            raise LeaseLost(str(product_id), worker_id)
        return product

    async def release_job(
        self,
        product_id: UUID,
        *,
        worker_id: str,
        error: str,
        retry_in_s: float,
        max_attempts: int,
        refund_attempt: bool = False,
    ) -> Product | None:
        run_after = self._after(max(retry_in_s, 0))

        def work(conn: sqlite3.Connection, now: str) -> Product | None:
            current = self._one(
                conn,
                "select * from {t} where id = ? and lease_owner = ? and status = 'processing'",
                (str(product_id), worker_id),
            )
            if current is None:
                return None
            gave_up = not refund_attempt and current.attempts >= max_attempts
            attempts = max(current.attempts - 1, 0) if refund_attempt else current.attempts
            return self._end_or_requeue(conn, current, gave_up=gave_up, error=error, attempts=attempts,
                                        run_after=run_after, now=now)

        return await self._tx(work)

    async def recover_stale_jobs(self, *, max_attempts: int) -> list[Product]:
        def work(conn: sqlite3.Connection, now: str) -> list[Product]:
            rows = conn.execute(
                f"select * from {self._table} where status = 'processing' and lease_expires_at < ?", (now,)
            ).fetchall()
            recovered = []
            for current in map(Product.from_row, rows):
                gave_up = current.attempts >= max_attempts
                reason = f"gave up after {current.attempts} attempts: the worker processing it stopped responding"
                product = self._end_or_requeue(conn, current, gave_up=gave_up, error=reason,
                                               attempts=current.attempts, run_after=now, now=now)
                recovered.append(product)
            return recovered

        return await self._tx(work)

    def _end_or_requeue(
        self,
        conn: sqlite3.Connection,
        current: Product,
        *,
        gave_up: bool,
        error: str,
        attempts: int,
        run_after: str,
        now: str,
    ) -> Product:
        """The SQLite twin of the CASE logic in release_job/recover_stale_jobs (002_job_functions.sql)."""
        urls = [v.url for v in current.variants if v.status == VariantStatus.DONE and v.url]
        if not gave_up:
            status, error_text, generated, image_url = "pending", None, current.generated_image_urls, current.image_url
        else:
            status = "done" if urls else "failed"
            error_text, generated, image_url = error, urls, (urls[0] if urls else current.image_url)
        product = self._one(
            conn,
            "update {t} set status = ?, attempts = ?, error = ?, generated_image_urls = ?, image_url = ?, "
            "lease_owner = null, lease_expires_at = null, run_after = ?, updated_at = ? where id = ? returning *",
            (status, attempts, error_text, json.dumps(generated), image_url, run_after, now, str(current.id)),
        )
        assert product is not None
        return product

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("select 1").fetchone())

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock, self._read_lock:
                self._conn.close()
                self._read_conn.close()

        await asyncio.to_thread(close)
