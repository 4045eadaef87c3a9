"""The HTTP API. Wiring only: settings → services in the lifespan, routes, error mapping, CORS.

Run it with ``uvicorn main:create_app --factory`` (``make run``). Tests call ``create_app(settings, services=…)``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from uuid import UUID

import structlog
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
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


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No product with this id"},
    409: {"model": ErrorOut, "description": "The product is being processed"},
    413: {"model": ErrorOut, "description": "The file is larger than MAX_UPLOAD_BYTES"},
    415: {"model": ErrorOut, "description": "Not a JPEG, PNG or WebP image"},
    503: {"model": ErrorOut, "description": "Storage or database unavailable; try again"},
}


# ---------------------------------------------------------------------------------------------------------------------
# Dependencies


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


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
    title = title.strip() or "Untitled"
    if len(title) > max_chars:
        raise InputError(f"title is {len(title)} characters; at most {max_chars} are allowed")
    return title


def clean_type(jewellery_type: str | None, max_chars: int) -> str | None:
    if jewellery_type is None or not jewellery_type.strip():
        return None
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
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        # Credentials never go with a wildcard origin: any site could then act with a visitor's cookies.
        allow_credentials=not wildcard,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
        expose_headers=["Location", "X-Request-ID"],
    )
    app.add_middleware(UploadLimitMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
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
        responses={k: v for k, v in ERRORS.items() if k in (413, 415, 503)},
        summary="Upload a photo and start processing",
    )
    async def process(
        services: ServicesDep,
        file: Annotated[UploadFile, File(description="JPEG, PNG or WebP photo of the piece")],
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
        responses={k: v for k, v in ERRORS.items() if k in (404, 409, 413, 415, 503)},
        summary="Process a product again, optionally with a new photo",
    )
    async def reprocess(
        product_id: UUID,
        services: ServicesDep,
        file: Annotated[UploadFile | None, File(description="Optional new photo")] = None,
    ) -> JSONResponse:
        upload = await read_upload(file, services.settings.max_upload_bytes) if file is not None else None
        product = await resubmit_product(services, product_id, upload=upload)
        return _accepted(product, "Processing restarted")

    @app.get("/products", response_model=ProductPage, summary="Products, newest first (for operators)")
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

    @app.get("/storage/{bucket}/{path:path}", include_in_schema=False)
    async def local_file(bucket: str, path: str, services: ServicesDep) -> FileResponse:
        store = services.images
        try:
            target = store.file_path(bucket, path) if isinstance(store, LocalImageStore) else None
        except ValueError:
            target = None
        if target is None or not target.is_file():
            raise HTTPException(404, "file not found")
        return FileResponse(target, media_type=LocalImageStore.content_type(target), headers={"cache-control": "no-cache"})

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
