"""A strict fake of Reve's image edit API (PROVIDERS.md §1), with fault injection.

Built from the documented API, not from our client: it rejects what the real service rejects, so a client bug
shows up as the error the real service would give.

Usage::

    fake = FakeReve(api_key="papi.test-key")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="https://api.reve.com")
    fake.enqueue(HttpError(503))                  # the next POST answers 503, the one after is normal
    base_url, stop = serve_in_thread(fake.app)    # or over a loopback port (tests.fakes.server)

Endpoint: ``POST /v1/image/edit`` and ``/v1/image/edit/``. Each POST is handled in this order:

1. counted in ``calls`` and logged in ``requests`` (headers and parsed JSON body), then one queued fault is
   taken (if any) and ``latency_s`` slept;
2. transport and HTTP faults answer at once (:class:`HttpError`, :class:`Drop`, :class:`Stall`);
   :class:`Delay` sleeps and carries on;
3. auth: ``Authorization: Bearer <api_key>``; missing → 401 ``UNAUTHORIZED``, wrong key or scheme → 401
   ``INVALID_API_KEY``;
4. ``Accept``: ``application/json`` (also when absent, ``*/*``, ``application/*``), ``image/png`` (also
   ``image/*``), ``image/webp``, ``image/jpeg``; q-values are honoured; anything else → 406 ``NOT_ACCEPTABLE``.
   **``image/jpeg`` is served faithfully: a JPEG, alpha dropped** (mode RGB, transparent pixels show their
   colour), so a client that asks for it gets a cut-out without transparency and its alpha check catches it;
5. the body: ``Content-Type: application/json`` and a JSON object, else 400. Checks, first failure wins:
   unknown top-level field → 400 ``UNKNOWN_FIELD``; ``edit_instruction`` / ``reference_image`` missing →
   400 ``MISSING_FIELD``; wrong JSON types, empty instruction → 400 ``INVALID_FIELD``; instruction over 2560
   characters → 400 ``PROMPT_TOO_LONG``; ``version`` not one of the four → 400 ``INVALID_VERSION``;
   ``aspect_ratio`` not in 16:9 9:16 3:2 2:3 4:3 3:4 1:1 → 400 ``INVALID_ASPECT_RATIO``; a postprocessing step
   that is not ``remove_background``, ``fit_image`` (``max_dim`` / ``max_width`` / ``max_height``, positive
   ints, at least one) or ``upscale`` (``upscale_factor`` 2, 3 or 4), or has unknown keys → 400
   ``INVALID_POSTPROCESSING``. Optional fields may be null. Then the image: a ``data:`` prefix or bad base64 →
   422 ``INVALID_BASE64``; not decodable → 422 ``INVALID_IMAGE``; not JPEG/PNG/GIF/WebP/TIFF/AVIF → 422
   ``UNSUPPORTED_IMAGE_FORMAT``; over 40 MiB, 33.5 million pixels or 8192 px a side → 400 ``IMAGE_TOO_LARGE``;
6. credits: an edit costs 30 (5 for the fast versions) plus ``remove_background_credits_per_mp`` per started
   output megapixel when ``remove_background`` runs (0 by default: the real rate is not published); too few
   credits → 402 ``INSUFFICIENT_CREDITS``;
7. outcome faults (:class:`ContentViolation`, :class:`CorruptImage`, :class:`OpaqueCutout`), else the edit.

The "edit" re-renders the whole image as the real model does: alpha flattened onto white, cropped to
``aspect_ratio`` if given, tinted by ``edit_tint`` (warmer by default), opaque RGB. The postprocessing steps then
run in order: ``remove_background`` makes pixels close to the border's median colour transparent with a soft
ramp (a real RGBA image, same size); ``fit_image`` only ever shrinks; ``upscale`` multiplies the size.

Success (JSON): ``{"image": <base64 PNG>, "version": "reve-edit@20250915", "content_violation": false,
"request_id": "rsid-…", "credits_used": 30, "credits_remaining": 970}``; ``latest`` / ``latest-fast`` are
reported as the dated versions. Image mode: the raw bytes with ``X-Reve-Version``,
``X-Reve-Content-Violation``, ``X-Reve-Request-Id``, ``X-Reve-Credits-Used``, ``X-Reve-Credits-Remaining``.
Errors: ``{"error_code": …, "message": …, "params": {…}}`` with ``X-Reve-Error-Code`` and
``X-Reve-Request-Id`` headers; unknown paths and methods answer in the same shape.

Faults, queued with ``fake.enqueue(fault, times=1)`` and consumed one per POST, in order (a POST rejected for
its body still consumes the fault it drew):

- ``HttpError(status, error_code=None, message=None, retry_after=None)``: that status with the error body
  (default codes per status); ``retry_after`` (int or float seconds) sets ``Retry-After`` verbatim, e.g.
  ``HttpError(429, retry_after=1.5)``;
- ``ContentViolation()``: HTTP 200, ``content_violation: true``, ``image: ""`` (image mode: empty body and
  ``X-Reve-Content-Violation: true``); not billed;
- ``CorruptImage(mode)``: HTTP 200 whose image is ``"truncated"`` (half a PNG), ``"not_image"`` (HTML bytes) or
  ``"invalid_base64"`` (JSON mode; in image mode the same as ``not_image``); billed;
- ``OpaqueCutout()``: HTTP 200 with an opaque RGB image even though ``remove_background`` was asked; billed;
- ``Delay(seconds)``, ``Drop()``, ``Stall()``: see ``tests.fakes.server`` for how each behaves in-process and
  on a socket.

Counters: ``calls`` (POSTs received, billed or not), ``billed`` (edits that returned an image and were charged),
``credits_remaining``, ``requests`` (every POST's :class:`ReveRequest`), ``stats()``, ``reset()``.

Admin endpoints (no auth; for a fake in another process): ``POST /__admin/enqueue`` (a fault as JSON, or a
list: ``{"kind": "http_error", "status": 429, "retry_after": 2, "times": 1}``; kinds ``http_error``,
``content_violation``, ``corrupt_image`` (``mode``), ``opaque_cutout``, ``delay`` (``seconds``), ``drop``,
``stall``), ``GET /__admin/stats``, ``GET /__admin/requests``, ``POST /__admin/reset``,
``POST /__admin/configure`` (``latency_s``, ``credits``, ``edit_tint``, ``remove_background_credits_per_mp``).

Run alone: ``python -m tests.fakes.reve --port 0`` prints ``READY <base_url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import math
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import Delay, Drop, Stall, apply_connection_fault, connection_fault_from_json, serve_forever

__all__ = [
    "ContentViolation",
    "CorruptImage",
    "Delay",
    "Drop",
    "FakeReve",
    "HttpError",
    "OpaqueCutout",
    "ReveFault",
    "ReveRequest",
    "Stall",
    "fault_from_json",
]

DEFAULT_API_KEY = "papi.test-key"
MAX_INSTRUCTION_CHARS = 2560
MAX_INPUT_BYTES = 40 * 1024 * 1024
MAX_INPUT_PIXELS = 33_500_000
MAX_SIDE_PX = 8192
VERSIONS = {
    "latest": "reve-edit@20250915",
    "latest-fast": "reve-edit-fast@20251030",
    "reve-edit@20250915": "reve-edit@20250915",
    "reve-edit-fast@20251030": "reve-edit-fast@20251030",
}
FAST_VERSIONS = frozenset({"reve-edit-fast@20251030"})
EDIT_CREDITS = 30
FAST_EDIT_CREDITS = 5
ASPECT_RATIOS = frozenset({"16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "1:1"})
INPUT_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "TIFF", "AVIF"})
REQUEST_FIELDS = frozenset({"edit_instruction", "reference_image", "version", "aspect_ratio", "postprocessing"})
STEP_KEYS = {
    "remove_background": frozenset(),
    "fit_image": frozenset({"max_dim", "max_width", "max_height"}),
    "upscale": frozenset({"upscale_factor"}),
}
UPSCALE_FACTORS = frozenset({2, 3, 4})

MediaType = Literal["application/json", "image/png", "image/webp", "image/jpeg"]
ACCEPTABLE: dict[str, MediaType] = {
    "application/json": "application/json",
    "application/*": "application/json",
    "*/*": "application/json",
    "image/png": "image/png",
    "image/*": "image/png",
    "image/webp": "image/webp",
    "image/jpeg": "image/jpeg",
}
DEFAULT_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    402: "INSUFFICIENT_CREDITS",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    422: "UNPROCESSABLE_ENTITY",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
# remove_background: distance (0-441) from the backdrop colour where alpha starts rising, and where it is full.
CUTOUT_RAMP = (18.0, 60.0)


@dataclass(frozen=True)
class HttpError:
    """Answer with ``status`` and Reve's error body; ``retry_after`` sets ``Retry-After`` (seconds)."""

    status: int
    error_code: str | None = None
    message: str | None = None
    retry_after: float | int | None = None
    kind: ClassVar[str] = "http_error"


@dataclass(frozen=True)
class ContentViolation:
    """HTTP 200 flagged ``content_violation`` with an empty image."""

    kind: ClassVar[str] = "content_violation"


@dataclass(frozen=True)
class CorruptImage:
    """HTTP 200 whose image cannot be used."""

    mode: Literal["truncated", "not_image", "invalid_base64"] = "truncated"
    kind: ClassVar[str] = "corrupt_image"


@dataclass(frozen=True)
class OpaqueCutout:
    """HTTP 200 with an opaque RGB image although ``remove_background`` was requested."""

    kind: ClassVar[str] = "opaque_cutout"


ReveFault = HttpError | ContentViolation | CorruptImage | OpaqueCutout | Delay | Drop | Stall


def fault_from_json(data: dict[str, Any]) -> ReveFault:
    """Build a fault from its admin JSON: ``{"kind": ..., <fields>}`` (``times`` is handled by the caller)."""
    fields = {k: v for k, v in data.items() if k not in ("kind", "times")}
    kind = str(data.get("kind"))
    connection_fault = connection_fault_from_json(kind, fields)
    if connection_fault is not None:
        return connection_fault
    for cls in (HttpError, ContentViolation, CorruptImage, OpaqueCutout):
        if cls.kind == kind:
            fault: ReveFault = cls(**fields)
            return fault
    raise ValueError(f"unknown Reve fault kind {kind!r}")


@dataclass(frozen=True)
class ReveRequest:
    """One POST as received: lower-cased headers and the parsed JSON body (None if it was not JSON)."""

    path: str
    headers: dict[str, str]
    json: Any


class ReveApiError(Exception):
    """A rejection the real API would make; rendered as Reve's error body."""

    def __init__(self, status: int, error_code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.params = params


@dataclass(frozen=True)
class EditRequest:
    instruction: str
    reference_image: str
    version: str
    aspect_ratio: str | None
    steps: tuple[dict[str, Any], ...]

    @property
    def removes_background(self) -> bool:
        return any(step["process"] == "remove_background" for step in self.steps)

    @property
    def base_credits(self) -> int:
        return FAST_EDIT_CREDITS if VERSIONS[self.version] in FAST_VERSIONS else EDIT_CREDITS


@dataclass
class _State:
    faults: deque[ReveFault] = field(default_factory=deque)
    calls: int = 0
    billed: int = 0
    requests: list[ReveRequest] = field(default_factory=list)


class FakeReve:
    """The fake Reve API; ``.app`` is the ASGI app. See the module docstring for behaviour and faults."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        *,
        credits: int = 1000,
        latency_s: float = 0.0,
        edit_tint: float = 0.04,
        remove_background_credits_per_mp: int = 0,
    ) -> None:
        self.api_key = api_key
        self.initial_credits = credits
        self.credits_remaining = credits
        self.latency_s = latency_s
        self.edit_tint = edit_tint
        self.remove_background_credits_per_mp = remove_background_credits_per_mp
        # Counters are touched from the server's thread and read from the test's: one lock, never held over await.
        self._lock = threading.Lock()
        self._state = _State()
        self.app = Starlette(
            routes=[
                Route("/v1/image/edit", self._edit, methods=["POST"]),
                Route("/v1/image/edit/", self._edit, methods=["POST"]),
                Route("/__admin/enqueue", self._admin_enqueue, methods=["POST"]),
                Route("/__admin/stats", self._admin_stats, methods=["GET"]),
                Route("/__admin/requests", self._admin_requests, methods=["GET"]),
                Route("/__admin/reset", self._admin_reset, methods=["POST"]),
                Route("/__admin/configure", self._admin_configure, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -- test-facing API ---------------------------------------------------------------------------------------

    def enqueue(self, fault: ReveFault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` POSTs (after the faults already queued)."""
        with self._lock:
            self._state.faults.extend([fault] * times)

    @property
    def calls(self) -> int:
        return self._state.calls

    @property
    def billed(self) -> int:
        return self._state.billed

    @property
    def requests(self) -> list[ReveRequest]:
        with self._lock:
            return list(self._state.requests)

    @property
    def pending_faults(self) -> int:
        return len(self._state.faults)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._state.calls,
                "billed": self._state.billed,
                "credits_remaining": self.credits_remaining,
                "pending_faults": len(self._state.faults),
            }

    def reset(self) -> None:
        """Forget faults, counters and the request log; restore the initial credits."""
        with self._lock:
            self._state = _State()
            self.credits_remaining = self.initial_credits

    # -- the API -------------------------------------------------------------------------------------------------

    async def _edit(self, request: Request) -> Response:
        body = await request.body()
        parsed = _parse_json(body)
        with self._lock:
            self._state.calls += 1
            self._state.requests.append(ReveRequest(path=request.url.path, headers=dict(request.headers), json=parsed))
            fault = self._state.faults.popleft() if self._state.faults else None
        request_id = f"rsid-{uuid.uuid4()}"
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        interrupted = await apply_connection_fault(request, fault)
        if interrupted is not None:
            return interrupted
        if isinstance(fault, HttpError):
            return _error_response(
                ReveApiError(
                    fault.status,
                    fault.error_code or DEFAULT_ERROR_CODES.get(fault.status, "ERROR"),
                    fault.message or f"Injected HTTP {fault.status}.",
                ),
                request_id,
                retry_after=fault.retry_after,
            )
        try:
            return await self._answer_edit(request, body, parsed, fault, request_id)
        except ReveApiError as exc:
            return _error_response(exc, request_id)

    async def _answer_edit(
        self, request: Request, body: bytes, parsed: Any, fault: ReveFault | None, request_id: str
    ) -> Response:
        self._check_auth(request.headers.get("authorization"))
        media_type = negotiate(request.headers.get("accept"))
        if media_type is None:
            raise ReveApiError(406, "NOT_ACCEPTABLE", "Accept must allow application/json, image/png, image/webp.")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ReveApiError(400, "INVALID_CONTENT_TYPE", "Content-Type must be application/json.")
        edit = parse_edit_request(parsed)
        image = await asyncio.to_thread(decode_reference_image, edit.reference_image)
        self._reserve_credits(edit.base_credits)
        if isinstance(fault, ContentViolation):
            self._refund_credits(edit.base_credits)
            return _violation_response(media_type, edit, request_id, self.credits_remaining)
        try:
            result = await asyncio.to_thread(self._render, image, edit, fault)
        except BaseException:
            self._refund_credits(edit.base_credits)
            raise
        credits_used = edit.base_credits + self._charge_cutout(edit, result)
        with self._lock:
            self._state.billed += 1
            remaining = self.credits_remaining
        payload = encode_output(result, media_type, fault)
        meta = {
            "version": VERSIONS[edit.version],
            "request_id": request_id,
            "credits_used": credits_used,
            "credits_remaining": remaining,
        }
        if media_type == "application/json":
            image_field = "###not-base64###" if _is_corrupt(fault, "invalid_base64") else _b64(payload)
            return JSONResponse(
                {"image": image_field, "version": meta["version"], "content_violation": False, **_ids(meta)},
                headers={"X-Reve-Request-Id": request_id},
            )
        return Response(payload, media_type=media_type, headers=_image_headers(meta, violation=False))

    def _check_auth(self, header: str | None) -> None:
        if not header:
            raise ReveApiError(401, "UNAUTHORIZED", "Missing Authorization header.")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise ReveApiError(401, "INVALID_API_KEY", "Invalid API key.")

    def _reserve_credits(self, amount: int) -> None:
        with self._lock:
            if self.credits_remaining < amount:
                raise ReveApiError(
                    402,
                    "INSUFFICIENT_CREDITS",
                    "Not enough credits.",
                    credits_required=amount,
                    credits_remaining=self.credits_remaining,
                )
            self.credits_remaining -= amount

    def _refund_credits(self, amount: int) -> None:
        with self._lock:
            self.credits_remaining += amount

    def _charge_cutout(self, edit: EditRequest, result: Image.Image) -> int:
        if not edit.removes_background or self.remove_background_credits_per_mp <= 0:
            return 0
        extra = math.ceil(result.width * result.height / 1_000_000) * self.remove_background_credits_per_mp
        with self._lock:
            extra = min(extra, self.credits_remaining)
            self.credits_remaining -= extra
        return extra

    def _render(self, image: Image.Image, edit: EditRequest, fault: ReveFault | None) -> Image.Image:
        result = render_edit(image, self.edit_tint, edit.aspect_ratio)
        for step in edit.steps:
            if step["process"] == "remove_background":
                if not isinstance(fault, OpaqueCutout):
                    result = remove_background(result)
            elif step["process"] == "fit_image":
                result = fit_image(result, step)
            else:
                result = result.resize(
                    (result.width * step["upscale_factor"], result.height * step["upscale_factor"]),
                    Image.Resampling.LANCZOS,
                )
        return result

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = DEFAULT_ERROR_CODES.get(exc.status_code, "ERROR")
        return _error_response(ReveApiError(exc.status_code, code, str(exc.detail)), f"rsid-{uuid.uuid4()}")

    # -- admin -----------------------------------------------------------------------------------------------------

    async def _admin_enqueue(self, request: Request) -> Response:
        data = await request.json()
        items = data if isinstance(data, list) else [data]
        try:
            for item in items:
                self.enqueue(fault_from_json(item), times=int(item.get("times", 1)))
        except (TypeError, ValueError, KeyError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"pending_faults": self.pending_faults})

    async def _admin_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse([asdict(r) for r in self.requests])

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse(self.stats())

    async def _admin_configure(self, request: Request) -> Response:
        data = await request.json()
        settable = {"latency_s": float, "edit_tint": float, "remove_background_credits_per_mp": int}
        for name, value in data.items():
            if name == "credits":
                with self._lock:
                    self.initial_credits = self.credits_remaining = int(value)
            elif name in settable:
                setattr(self, name, settable[name](value))
            else:
                return JSONResponse({"error": f"unknown setting {name!r}"}, status_code=400)
        return JSONResponse(self.stats())


# -- request parsing -------------------------------------------------------------------------------------------


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def negotiate(accept: str | None) -> MediaType | None:
    """The response type for an ``Accept`` header (highest q wins, then header order); None if none fits."""
    if accept is None or not accept.strip():
        return "application/json"
    best: MediaType | None = None
    best_q = 0.0
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        target = ACCEPTABLE.get(media.lower())
        if target is not None and q > best_q:
            best, best_q = target, q
    return best


def parse_edit_request(body: Any) -> EditRequest:
    """Validate a request body as the real API does; raise :class:`ReveApiError` on the first problem."""
    if not isinstance(body, dict):
        raise ReveApiError(400, "INVALID_JSON", "The request body must be a JSON object.")
    for name in body:
        if name not in REQUEST_FIELDS:
            raise ReveApiError(400, "UNKNOWN_FIELD", f"Unknown field {name!r}.", field=name)
    for name in ("edit_instruction", "reference_image"):
        if body.get(name) is None:
            raise ReveApiError(400, "MISSING_FIELD", f"Field {name!r} is required.", field=name)
        if not isinstance(body[name], str):
            raise ReveApiError(400, "INVALID_FIELD", f"Field {name!r} must be a string.", field=name)
    instruction: str = body["edit_instruction"]
    if not instruction.strip():
        raise ReveApiError(400, "INVALID_FIELD", "edit_instruction must not be empty.", field="edit_instruction")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ReveApiError(
            400,
            "PROMPT_TOO_LONG",
            f"edit_instruction is {len(instruction)} characters; the limit is {MAX_INSTRUCTION_CHARS}.",
            max_length=MAX_INSTRUCTION_CHARS,
            length=len(instruction),
        )
    version = body.get("version")
    if version is None:
        version = "latest"
    if version not in VERSIONS:
        raise ReveApiError(400, "INVALID_VERSION", f"Unknown version {version!r}.", field="version")
    aspect_ratio = body.get("aspect_ratio")
    if aspect_ratio is not None and aspect_ratio not in ASPECT_RATIOS:
        raise ReveApiError(
            400, "INVALID_ASPECT_RATIO", f"Unsupported aspect_ratio {aspect_ratio!r}.", field="aspect_ratio"
        )
    return EditRequest(
        instruction=instruction,
        reference_image=body["reference_image"],
        version=version,
        aspect_ratio=aspect_ratio,
        steps=_parse_steps(body.get("postprocessing")),
    )


def _parse_steps(raw: Any) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ReveApiError(400, "INVALID_POSTPROCESSING", "postprocessing must be a list.")
    steps = []
    for index, step in enumerate(raw):
        if not isinstance(step, dict) or step.get("process") not in STEP_KEYS:
            raise ReveApiError(400, "INVALID_POSTPROCESSING", f"Unknown postprocessing step {step!r}.", index=index)
        allowed = STEP_KEYS[step["process"]]
        extra = set(step) - allowed - {"process"}
        if extra:
            raise ReveApiError(
                400, "INVALID_POSTPROCESSING", f"Unknown keys {sorted(extra)} in {step['process']}.", index=index
            )
        if step["process"] == "fit_image":
            dims = [step[k] for k in allowed if k in step]
            if not dims or not all(_positive_int(d) for d in dims):
                raise ReveApiError(
                    400, "INVALID_POSTPROCESSING", "fit_image needs positive integer max_dim/max_width/max_height."
                )
        if step["process"] == "upscale" and step.get("upscale_factor") not in UPSCALE_FACTORS:
            raise ReveApiError(400, "INVALID_POSTPROCESSING", "upscale_factor must be 2, 3 or 4.", index=index)
        steps.append(dict(step))
    return tuple(steps)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def decode_reference_image(encoded: str) -> Image.Image:
    """Decode ``reference_image`` (raw base64) and load it, enforcing the documented limits."""
    if encoded.startswith("data:"):
        raise ReveApiError(422, "INVALID_BASE64", "reference_image must be raw base64 without a data: prefix.")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ReveApiError(422, "INVALID_BASE64", "reference_image is not valid base64.") from exc
    if len(raw) > MAX_INPUT_BYTES:
        raise ReveApiError(400, "IMAGE_TOO_LARGE", "reference_image is over 40 MB.", size_bytes=len(raw))
    try:
        image = Image.open(io.BytesIO(raw))
        image_format = image.format
        width, height = image.size
        if image_format not in INPUT_FORMATS:
            raise ReveApiError(422, "UNSUPPORTED_IMAGE_FORMAT", f"Unsupported image format {image_format}.")
        if width * height > MAX_INPUT_PIXELS or max(width, height) > MAX_SIDE_PX:
            raise ReveApiError(400, "IMAGE_TOO_LARGE", f"The image is {width}x{height}.", width=width, height=height)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow warns above ~89 Mpx (an exception under -W error) and refuses twice that: over our limit anyway.
        raise ReveApiError(400, "IMAGE_TOO_LARGE", "The image has too many pixels.") from exc
    except ReveApiError:
        raise
    except Exception as exc:
        raise ReveApiError(422, "INVALID_IMAGE", "reference_image could not be decoded as an image.") from exc
    return ImageOps.exif_transpose(image)


# -- image work ----------------------------------------------------------------------------------------------------


def render_edit(image: Image.Image, tint: float, aspect_ratio: str | None) -> Image.Image:
    """The edit model's re-render: opaque RGB, optionally re-framed, colours drifted by ``tint``."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
    else:
        flat = image.convert("RGB")
    if aspect_ratio is not None:
        w, h = (int(x) for x in aspect_ratio.split(":"))
        flat = ImageOps.fit(flat, _frame_size(flat.size, w / h), Image.Resampling.LANCZOS)
    pixels = np.asarray(flat, dtype=np.float32) * np.array([1 + tint, 1.0, 1 - tint], dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _frame_size(size: tuple[int, int], ratio: float) -> tuple[int, int]:
    width, height = size
    if width / height > ratio:
        return max(1, round(height * ratio)), height
    return width, max(1, round(width / ratio))


def remove_background(image: Image.Image) -> Image.Image:
    """Make pixels near the border's median colour transparent, with a soft ramp; returns RGBA, same size."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    backdrop = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - backdrop, axis=2)
    low, high = CUTOUT_RAMP
    alpha = np.clip((distance - low) / (high - low), 0.0, 1.0) * 255.0
    matte = Image.fromarray(alpha.round().astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1))
    cutout = image.convert("RGBA")
    cutout.putalpha(matte)
    return cutout


def fit_image(image: Image.Image, step: dict[str, Any]) -> Image.Image:
    """Shrink (never enlarge) to fit max_dim / max_width / max_height, keeping the aspect ratio."""
    max_w = min(step.get("max_dim", MAX_SIDE_PX * 4), step.get("max_width", MAX_SIDE_PX * 4))
    max_h = min(step.get("max_dim", MAX_SIDE_PX * 4), step.get("max_height", MAX_SIDE_PX * 4))
    scale = min(max_w / image.width, max_h / image.height, 1.0)
    if scale >= 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_output(image: Image.Image, media_type: MediaType, fault: ReveFault | None) -> bytes:
    """Encode the result for ``media_type``, corrupted if ``fault`` says so."""
    if _is_corrupt(fault, "not_image") or _is_corrupt(fault, "invalid_base64"):
        return b"<html><body>502 Bad Gateway</body></html>"
    buffer = io.BytesIO()
    if media_type == "image/jpeg":
        # What the real API does with image/jpeg: the alpha channel is simply gone.
        image.convert("RGB").save(buffer, "JPEG", quality=90)
    elif media_type == "image/webp":
        image.save(buffer, "WEBP", lossless=True)
    else:
        image.save(buffer, "PNG", compress_level=1)
    data = buffer.getvalue()
    if _is_corrupt(fault, "truncated"):
        return data[: len(data) // 2]
    return data


def _is_corrupt(fault: ReveFault | None, mode: str) -> bool:
    return isinstance(fault, CorruptImage) and fault.mode == mode


# -- responses -----------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ids(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("request_id", "credits_used", "credits_remaining")}


def _image_headers(meta: dict[str, Any], *, violation: bool) -> dict[str, str]:
    return {
        "X-Reve-Version": str(meta["version"]),
        "X-Reve-Content-Violation": "true" if violation else "false",
        "X-Reve-Request-Id": str(meta["request_id"]),
        "X-Reve-Credits-Used": str(meta["credits_used"]),
        "X-Reve-Credits-Remaining": str(meta["credits_remaining"]),
    }


def _violation_response(media_type: MediaType, edit: EditRequest, request_id: str, remaining: int) -> Response:
    meta = {
        "version": VERSIONS[edit.version],
        "request_id": request_id,
        "credits_used": 0,
        "credits_remaining": remaining,
    }
    if media_type == "application/json":
        return JSONResponse(
            {"image": "", "version": meta["version"], "content_violation": True, **_ids(meta)},
            headers={"X-Reve-Request-Id": request_id},
        )
    return Response(b"", media_type=media_type, headers=_image_headers(meta, violation=True))


def _error_response(exc: ReveApiError, request_id: str, *, retry_after: float | int | None = None) -> Response:
    headers = {"X-Reve-Error-Code": exc.error_code, "X-Reve-Request-Id": request_id}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(
        {"error_code": exc.error_code, "message": exc.message, "params": exc.params},
        status_code=exc.status,
        headers=headers,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.fakes.reve``: serve a fake on a port until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--credits", type=int, default=1000)
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    fake = FakeReve(args.api_key, credits=args.credits, latency_s=args.latency_s)
    serve_forever(fake.app, args.host, args.port)


if __name__ == "__main__":
    main()
