"""The HTTP API. Wiring only: settings → services in the lifespan, routes, error mapping, CORS.

Run it with ``uvicorn main:create_app --factory`` (``make run``). Tests call ``create_app(settings, services=…)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import structlog
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai_clients import NanobanaClient
from config import Settings
from database import Product
from errors import ConfigError, DatabaseError, InputError, JobRunning, ProductNotFound, StorageError, UploadTooLarge
from pipeline import Services, resubmit_product, submit_product
from storage import LocalImageStore
from worker import Worker, configure_from, open_services

log = structlog.get_logger(__name__)

# Multipart framing around the file (boundaries, headers, the title field) on top of MAX_UPLOAD_BYTES.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
UPLOAD_PAGE = Path(__file__).resolve().parent / "static" / "index.html"
UPLOAD_CHUNK_BYTES = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Response models


class ProcessAccepted(BaseModel):
    message: str = Field(examples=["Image received; processing started"])
    product_id: UUID
    raw_image_url: str | None = Field(examples=["http://localhost:8000/storage/plant-images/products/3f0c….jpg?v=1a2b"])
    status_url: str = Field(examples=["/product/3f0c1d2e-…"])


class ProductPage(BaseModel):
    items: list[Product]
    limit: int
    offset: int


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    environment: str = Field(examples=["development"])
    database: str = Field(examples=["sqlite"])
    storage: str = Field(examples=["local"])
    background_remover: str = Field(examples=["local"])
    variant_generator: str = Field(examples=["local"])
    worker: str = Field(examples=["running"])


class ErrorOut(BaseModel):
    detail: str


class InvalidInputOut(BaseModel):
    """422: our own message (an unreadable image, a title too long) or FastAPI's list of invalid fields."""

    detail: str | list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The multipart body could not be parsed"},
    401: {"model": ErrorOut, "description": "API_KEYS is set and no valid key was sent"},
    404: {"model": ErrorOut, "description": "No product with this id"},
    409: {"model": ErrorOut, "description": "The product is being processed"},
    413: {"model": ErrorOut, "description": "The file is larger than MAX_UPLOAD_BYTES"},
    415: {"model": ErrorOut, "description": "Not a JPEG, PNG, WebP or HEIC image"},
    422: {"model": InvalidInputOut, "description": "An unreadable or out-of-bounds image, or an invalid field"},
    429: {"model": ErrorOut, "description": "Too many uploads; see Retry-After"},
    503: {"model": ErrorOut, "description": "Storage or database unavailable; try again"},
}


# ---------------------------------------------------------------------------------------------------------------------
# Dependencies


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

# Documentation only (the padlock and "Authorize" in /docs): `AccessMiddleware` enforces keys before the body is read.
_API_KEY_DOCS = [
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="One of API_KEYS, when set")),
    Security(HTTPBearer(auto_error=False, description="Or the same key as a bearer token")),
]


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refusing more than ``max_bytes`` (the body cap already stopped anything far larger)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(UPLOAD_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise UploadTooLarge(f"the file is larger than the {max_bytes:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def clean_title(title: str, max_chars: int) -> str:
    _refuse_nul("title", title)
    title = title.strip() or "Untitled"
    if len(title) > max_chars:
        raise InputError(f"title is {len(title)} characters; at most {max_chars} are allowed")
    return title


def _refuse_nul(field: str, value: str) -> None:
    # PostgreSQL text cannot hold U+0000: PostgREST would refuse the row and the client would get a 503.
    if "\x00" in value:
        raise InputError(f"{field} contains a NUL character (\\x00); remove it")


async def refuse_repeated_file(request: Request) -> None:
    """Two `file` parts would leave the client guessing which one we processed (Starlette keeps the last)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        if len((await request.form()).getlist("file")) > 1:
            raise InputError("send one photo per request, in a single `file` field")


def clean_type(jewellery_type: str | None, max_chars: int) -> str | None:
    if jewellery_type is None or not jewellery_type.strip():
        return None
    _refuse_nul("jewellery_type", jewellery_type)
    if len(jewellery_type) > max_chars:
        raise InputError(f"jewellery_type is longer than {max_chars} characters")
    return jewellery_type.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Middleware


class BodyTooLarge(Exception):
    pass


class UploadLimitMiddleware:
    """Refuse request bodies over a cap while they stream, with or without a Content-Length (413).

    FastAPI parses a multipart body completely before a route runs; without this, a 5 GB upload would be spooled
    to disk first.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send)
            return
        received = 0
        exceeded = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # The multipart parser turns our exception into its own 400; answer 413 in its place.
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused and message["type"] == "http.response.start":
                refused = True
                await self._refuse(send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not refused:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"the request body is larger than the {self.max_body_bytes:,}-byte limit"},
            status_code=413,
            headers={"connection": "close"},
        )
        await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


class RateLimiter:
    """A token bucket per caller: ``burst`` requests at once, refilled at ``per_minute``. Per process."""

    def __init__(self, *, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate_s = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str) -> float:
        """Spend one token; return 0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        tokens, last = self._buckets.get(caller, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate_s)
        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            self._forget_idle(now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self._rate_s if self._rate_s > 0 else 3600.0

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) > 10_000:
            full_after_s = self._burst / self._rate_s if self._rate_s > 0 else 3600.0
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after_s}


_PROTECTED = re.compile(r"^/(process(/[^/]+)?|products)/?$")


class AccessMiddleware:
    """API keys and rate limits for the routes that spend credits or list the catalogue.

    Checked before the body is read, so an unauthorised or throttled caller cannot make us parse a 10 MB upload.
    `GET /product/{id}` and `/health` stay open: product ids are unguessable UUIDs, and frontends poll them.
    """

    def __init__(self, app: ASGIApp, *, api_keys: list[str], limiter: RateLimiter | None) -> None:
        self.app = app
        self._keys = [key.encode() for key in api_keys]
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope.get("path", ""), scope.get("method", "")
        if scope["type"] != "http" or method not in ("GET", "POST") or not _PROTECTED.match(path):
            await self.app(scope, receive, send)
            return
        if method == "GET" and not path.startswith("/products"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        presented = headers.get(b"x-api-key") or _bearer(headers.get(b"authorization", b""))
        if self._keys:
            # Compare against every key, in constant time each, so timing tells nothing about which one is close.
            matched = False
            for key in self._keys:
                matched |= presented is not None and hmac.compare_digest(key, presented)
            if not matched:
                await _reply(send, 401, "a valid API key is required: send it as X-API-Key or "
                             "Authorization: Bearer <key>", {"www-authenticate": "Bearer"})
                return
            caller = "key:" + hashlib.sha256(presented or b"").hexdigest()[:16]
        else:
            client = scope.get("client")
            caller = "ip:" + (client[0] if client else "unknown")
        if method == "POST" and self._limiter is not None:
            wait_s = self._limiter.take(caller)
            if wait_s > 0:
                retry_after = str(max(1, math.ceil(wait_s)))
                await _reply(send, 429, f"too many uploads; try again in {retry_after} s",
                             {"retry-after": retry_after})
                return
        await self.app(scope, receive, send)


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.partition(b" ")
    return token.strip() or None if scheme.lower() == b"bearer" else None


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response({"type": "http"}, _empty_receive, send)


class RequestContextMiddleware:
    """Give every request an id (``X-Request-ID``, taken from the client when sane), bind it to the logs, and log
    one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
                )


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one mapping from our exceptions to HTTP


def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int | None = None, retry_after: str | None = None) -> Callable[..., Awaitable[JSONResponse]]:
        async def handle(_request: Request, exc: Exception) -> JSONResponse:
            code = status if status is not None else exc.status_code if isinstance(exc, InputError) else 400
            headers = {"retry-after": retry_after} if retry_after else None
            if code >= 500:
                log.error("dependency_unavailable", error=str(exc))
                detail = "a storage or database service is unavailable; try again shortly"
            else:
                detail = str(exc)
            return JSONResponse({"detail": detail}, status_code=code, headers=headers)

        return handle

    app.add_exception_handler(InputError, handler())
    app.add_exception_handler(ProductNotFound, handler(404))
    app.add_exception_handler(JobRunning, handler(409))
    app.add_exception_handler(StorageError, handler(503, retry_after="5"))
    app.add_exception_handler(DatabaseError, handler(503, retry_after="5"))


# ---------------------------------------------------------------------------------------------------------------------
# The app


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """Build the app. With ``services`` given (tests), the lifespan uses them instead of opening its own."""
    settings = settings or (services.settings if services else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            yield
            return
        configure_from(settings)
        try:
            backends = settings.resolve_backends()
            settings.check_access()
        except ConfigError as exc:
            log.error("config_error", error=str(exc))
            raise
        log.info("backends", environment=settings.environment, **vars(backends))
        async with open_services(settings) as built:
            app.state.services = built
            worker = Worker.from_settings(built) if settings.run_worker else None
            app.state.worker = worker
            runner = asyncio.create_task(worker.run()) if worker else None
            try:
                yield
            finally:
                if worker and runner:
                    await worker.stop()
                    await runner

    app = FastAPI(
        title="Jewellery image pipeline",
        version="1.0.0",
        summary="Upload a jewellery photo; get a cut-out and four styled product shots.",
        lifespan=lifespan,
    )
    app.state.worker = None
    if services is not None:
        app.state.services = services
    _install_error_handlers(app)
    wildcard = "*" in settings.cors_origins
    # Outermost first: request ids and logs → CORS (so browsers can read 401/429) → access → body cap → routes.
    app.add_middleware(UploadLimitMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    limiter = (
        RateLimiter(per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst)
        if settings.rate_limit_per_minute > 0
        else None
    )
    app.add_middleware(
        AccessMiddleware, api_keys=[k.get_secret_value() for k in settings.api_keys], limiter=limiter
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        # Credentials never go with a wildcard origin: any site could then act with a visitor's cookies.
        allow_credentials=not wildcard,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
        expose_headers=["Location", "X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestContextMiddleware)
    _add_routes(app, settings)
    return app


def _accepted(product: Product, message: str) -> JSONResponse:
    body = ProcessAccepted(
        message=message,
        product_id=product.id,
        raw_image_url=product.raw_image_url,
        status_url=f"/product/{product.id}",
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": body.status_url})


def _add_routes(app: FastAPI, settings: Settings) -> None:
    max_title = settings.max_title_chars

    @app.post(
        "/process",
        status_code=202,
        response_model=ProcessAccepted,
        responses={k: v for k, v in ERRORS.items() if k in (400, 401, 413, 415, 422, 429, 503)},
        summary="Upload a photo and start processing",
        dependencies=[*_API_KEY_DOCS, Depends(refuse_repeated_file)],
    )
    async def process(
        services: ServicesDep,
        file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or HEIC photo of the piece")],
        title: Annotated[str, Form(max_length=10_000)] = "Untitled",
        jewellery_type: Annotated[str | None, Form(max_length=10_000)] = None,
    ) -> JSONResponse:
        upload = await read_upload(file, services.settings.max_upload_bytes)
        product = await submit_product(
            services, upload=upload, title=clean_title(title, max_title), jewellery_type=clean_type(jewellery_type, 100)
        )
        return _accepted(product, "Image received; processing started")

    @app.get(
        "/product/{product_id}",
        response_model=Product,
        responses={404: ERRORS[404], 503: ERRORS[503]},
        summary="The product row: status, progress per variant, and the image URLs",
    )
    async def get_product(product_id: UUID, services: ServicesDep) -> Product:
        product = await services.store.get_product(product_id)
        if product is None:
            raise ProductNotFound(str(product_id))
        return product

    @app.post(
        "/process/{product_id}",
        status_code=202,
        response_model=ProcessAccepted,
        responses={k: v for k, v in ERRORS.items() if k in (400, 401, 404, 409, 413, 415, 422, 429, 503)},
        summary="Process a product again, optionally with a new photo",
        dependencies=[*_API_KEY_DOCS, Depends(refuse_repeated_file)],
    )
    async def reprocess(
        product_id: UUID,
        services: ServicesDep,
        file: Annotated[UploadFile, File(description="Optional new photo")] = None,  # type: ignore[assignment]
    ) -> JSONResponse:
        upload = await read_upload(file, services.settings.max_upload_bytes) if file is not None else None
        product = await resubmit_product(services, product_id, upload=upload)
        return _accepted(product, "Processing restarted")

    @app.get(
        "/products",
        response_model=ProductPage,
        responses={401: ERRORS[401]},
        summary="Products, newest first (for operators)",
        dependencies=_API_KEY_DOCS,
    )
    async def list_products(
        services: ServicesDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> ProductPage:
        items = await services.store.list_products(limit=limit, offset=offset)
        return ProductPage(items=items, limit=limit, offset=offset)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="Liveness and backends")
    async def health(request: Request, services: ServicesDep) -> JSONResponse:
        worker: Worker | None = request.app.state.worker
        try:
            await asyncio.wait_for(services.store.ping(), timeout=5)
            status = "ok"
        except (DatabaseError, TimeoutError):
            status = "unavailable"
        body = Health(
            status=status,
            environment=services.settings.environment,
            worker="running" if worker else "off",
            **vars(services.backends),
        )
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    @app.get("/", include_in_schema=False)
    async def upload_page() -> FileResponse:
        # For shop staff: upload photos (several at once) and watch them become product shots.
        return FileResponse(UPLOAD_PAGE, media_type="text/html")

    @app.get("/storage/{bucket}/{path:path}", include_in_schema=False)
    async def local_file(bucket: str, path: str, services: ServicesDep) -> FileResponse:
        store = services.images
        try:
            target = store.file_path(bucket, path) if isinstance(store, LocalImageStore) else None
        except ValueError:
            target = None
        if target is None or not target.is_file():
            raise HTTPException(404, "file not found")
        media_type = LocalImageStore.content_type(target)
        return FileResponse(target, media_type=media_type, headers={"cache-control": "no-cache"})

    @app.post("/callbacks/nanobanana", include_in_schema=False)
    async def nanobanana_callback(request: Request, services: ServicesDep) -> dict[str, str]:
        # Callbacks carry no signature: treat one only as a hint to poll that task now.
        try:
            body = await request.json()
            task_id = body.get("data", {}).get("taskId") if isinstance(body, dict) else None
        except ValueError:
            task_id = None
        if isinstance(task_id, str) and isinstance(services.generator, NanobanaClient):
            services.generator.notify(task_id)
        return {"status": "received"}
