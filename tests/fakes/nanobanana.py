"""A strict fake of the NanoBanana API at api.nanobananaapi.ai (PROVIDERS.md §2), with fault injection.

Built from the documented API, not from our client. Usage::

    fake = FakeNanobanana(api_key="nb-test-key", fetch_transport=storage_transport)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="https://api.nanobananaapi.ai")
    fake.outcome_for(prompt_contains="Velvet", outcome="fail")   # that variant fails, whatever the order
    fake.enqueue("submit", BodyCode(455))                         # the next submit: HTTP 200, code 455

Every answer of the API routes is the envelope ``{"code": <int>, "msg": "…", "data": …}``. Errors the fake
raises itself (validation, auth, unknown task) come as **HTTP 200 with the error in ``code``** by default;
``envelope_errors="mirror"`` sends them with the same HTTP status instead. Faults choose their form explicitly.

``POST /api/v1/nanobanana/generate`` (submit), in this order: counted (``submits_received``) and logged; one
``submit`` fault taken and ``submit_latency_s`` slept; faults answer; ``Authorization: Bearer <api_key>`` (else
code 401); then the body, first failure wins, each code 400: a JSON object with ``Content-Type:
application/json``; ``prompt`` a non-empty string; ``type`` exactly ``"IMAGETOIAMGE"`` or ``"TEXTTOIAMGE"``
(the API's spelling); ``imageUrls`` a list of absolute http(s) URLs (non-empty for image-to-image; also
checked when given for text-to-image); ``callBackUrl`` present and an http(s) URL (it is listed as required);
``numImages`` when given an int 1-4; ``image_size`` when given one of ``1:1 9:16 16:9 3:4 4:3 3:2 2:3 5:4 4:5
21:9``. Optional fields may be null. Unknown fields are ignored, as a lenient JSON API would (so ``imageSize``
silently does nothing), and recorded in the request log's ``ignored_fields``. Accepted: ``{"code": 200, "msg":
"success", "data": {"taskId": "<32 hex>"}}``, counted in ``submits_accepted`` (billed).

Generation is lazy and clock-driven: a task stays at ``successFlag`` 0 until ``generation_s`` (per rule or
global) has passed on ``clock`` (injectable, ``time.monotonic`` by default), and the first poll after that
generates it. Generating downloads **every** ``imageUrls`` entry itself with httpx (through
``fetch_transport`` if given, else real HTTP; redirects followed): a failed fetch (transport error, non-2xx,
or a private/loopback host when ``reject_private_urls``) ends the task with ``successFlag`` 2 and an
``errorMessage``; an input that is not an image ends it with 3. The result is an opaque RGB PNG (or JPEG,
``result_format``) at Gemini's size for ``image_size`` (1024x1024 for 1:1, 864x1184 for 3:4, …; without
``image_size`` the ratio nearest the input's): a prompt-coloured backdrop with the first input composited on
it (its alpha used as the mask). It is served at ``<public_base_url>/files/<taskId>.png``; with
``public_base_url=None`` the base is the one the poll came in on, so it works in-process and on a port alike.

``GET /api/v1/nanobanana/record-info?taskId=<id>`` (poll): counted (``polls``, per task ``polls``); ``poll``
fault; ``poll_latency_s``; auth; ``task_id`` instead of ``taskId`` (or neither) → code 500; unknown task →
code 404; else ``data`` = ``{"taskId", "paramJson" (the submit body as a JSON string), "createTime",
"completeTime", "successFlag", "response": {"originImageUrl": null, "resultImageUrl": …} | null, "errorCode",
"errorMessage"}``. While generating ``errorCode``/``errorMessage`` are null; on success 0 and ``""``; on failure
the rule's values (which may be null, as the real ones may).

``GET /files/<name>`` (download, the provider's file host, no auth): counted (``downloads``, per task
``downloads``); ``download`` fault; 404 (plain text) for an unknown name, a ``url_404`` task, a result older
than ``result_ttl_s`` or one already downloaded ``result_max_downloads`` times.

Outcome rules (``outcome_for``) are matched at submit time, first registered first, on a case-insensitive
substring of the prompt (``prompt_contains=None`` matches all); ``times`` limits how many tasks a rule takes.
Outcomes: ``success``; ``fail`` (flag 3); ``create_failed`` (flag 2); ``success_empty_url`` (flag 1,
``resultImageUrl`` ``""``); ``never_finish`` (flag 0 forever); ``url_404`` (flag 1, the URL 404s). A rule can
also set ``generation_s``, ``error_code``/``error_message``, ``result_ttl_s`` and ``result_max_downloads``.

Faults, per endpoint (``fake.enqueue("submit" | "poll" | "download", fault, times=1)``), consumed in order:
``HttpError(status, code=None, msg=None, retry_after=None)`` (that HTTP status, envelope with ``code`` =
status unless given; plain text on the file host), ``BodyCode(code, msg=None, retry_after=None)`` (HTTP 200,
error in the body; not on ``download``), ``Delay(seconds)``, ``Drop()``, ``Stall()`` (see
``tests.fakes.server``), ``AcceptThenDrop()`` (``submit`` only: the task is created and billed, then the
connection drops, so a retry bills twice) and ``CorruptDownload()`` (``download`` only: HTTP 200 with half the
image). Faulted submits are not billed (except ``AcceptThenDrop``).

Admin endpoints (no auth): ``POST /__admin/enqueue`` (``{"endpoint": "poll", "kind": "body_code", "code": 455,
"times": 2}`` or a list; kinds ``http_error``, ``body_code``, ``accept_then_drop``, ``corrupt_download``,
``delay``, ``drop``, ``stall``), ``POST /__admin/outcome`` (``outcome_for``'s arguments as JSON),
``GET /__admin/stats``, ``GET /__admin/requests``, ``POST /__admin/reset``, ``POST /__admin/configure``.

Not modelled: callbacks to ``callBackUrl`` (never sent) and results for ``numImages`` > 1 (one image).

Run alone: ``python -m tests.fakes.nanobanana --port 0`` prints ``READY <base_url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import ipaddress
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .server import (
    Delay,
    Drop,
    DroppedConnection,
    Stall,
    apply_connection_fault,
    connection_fault_from_json,
    serve_forever,
)

__all__ = [
    "AcceptThenDrop",
    "BodyCode",
    "CorruptDownload",
    "Delay",
    "Drop",
    "FakeNanobanana",
    "FakeTask",
    "HttpError",
    "LoggedRequest",
    "NanobananaFault",
    "OutcomeRule",
    "Stall",
    "fault_from_json",
]

DEFAULT_API_KEY = "nb-test-key"
SUBMIT_PATH = "/api/v1/nanobanana/generate"
POLL_PATH = "/api/v1/nanobanana/record-info"
TASK_TYPES = frozenset({"IMAGETOIAMGE", "TEXTTOIAMGE"})
# Gemini 2.5 Flash Image's output sizes per aspect ratio.
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
MESSAGES = {
    200: "success",
    400: "Parameter error",
    401: "You do not have access permissions",
    402: "Insufficient credits",
    404: "Task not found",
    429: "Too many requests, please try again later",
    455: "Service unavailable: system maintenance",
    500: "Server exception, please try again later",
    501: "Image generation failed",
    505: "The feature is disabled",
}

Endpoint = Literal["submit", "poll", "download"]
Outcome = Literal["success", "fail", "create_failed", "success_empty_url", "never_finish", "url_404"]
ResultFormat = Literal["png", "jpeg"]
EnvelopeErrors = Literal["http200", "mirror"]


@dataclass(frozen=True)
class HttpError:
    """Answer with HTTP ``status`` (envelope ``code`` = ``code`` or ``status``); ``retry_after`` in seconds."""

    status: int
    code: int | None = None
    msg: str | None = None
    retry_after: float | int | None = None
    kind: ClassVar[str] = "http_error"


@dataclass(frozen=True)
class BodyCode:
    """Answer HTTP 200 with the error only in the envelope's ``code``."""

    code: int
    msg: str | None = None
    retry_after: float | int | None = None
    kind: ClassVar[str] = "body_code"


@dataclass(frozen=True)
class AcceptThenDrop:
    """Submit only: create and bill the task, then drop the connection before the reply."""

    kind: ClassVar[str] = "accept_then_drop"


@dataclass(frozen=True)
class CorruptDownload:
    """Download only: HTTP 200 with the first half of the image."""

    kind: ClassVar[str] = "corrupt_download"


NanobananaFault = HttpError | BodyCode | AcceptThenDrop | CorruptDownload | Delay | Drop | Stall
_ENDPOINT_ONLY: dict[type, Endpoint] = {AcceptThenDrop: "submit", CorruptDownload: "download"}


def fault_from_json(data: dict[str, Any]) -> NanobananaFault:
    """Build a fault from its admin JSON (``endpoint`` and ``times`` are handled by the caller)."""
    fields = {k: v for k, v in data.items() if k not in ("kind", "times", "endpoint")}
    kind = str(data.get("kind"))
    connection_fault = connection_fault_from_json(kind, fields)
    if connection_fault is not None:
        return connection_fault
    for cls in (HttpError, BodyCode, AcceptThenDrop, CorruptDownload):
        if cls.kind == kind:
            fault: NanobananaFault = cls(**fields)
            return fault
    raise ValueError(f"unknown NanoBanana fault kind {kind!r}")


@dataclass
class OutcomeRule:
    """How tasks whose prompt matches end; see ``FakeNanobanana.outcome_for``."""

    outcome: Outcome
    prompt_contains: str | None = None
    times: int | None = None
    generation_s: float | None = None
    error_code: int | None = 500
    error_message: str | None = "Image generation failed (fake)"
    result_ttl_s: float | None = None
    result_max_downloads: int | None = None

    def matches(self, prompt: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return self.prompt_contains is None or self.prompt_contains.lower() in prompt.lower()


@dataclass
class FakeTask:
    """One accepted task and what happened to it."""

    task_id: str
    params: dict[str, Any]
    rule: OutcomeRule
    generation_s: float
    created_at: float
    create_time: str
    result_format: ResultFormat
    success_flag: int = 0
    error_code: int | None = None
    error_message: str | None = None
    complete_time: str | None = None
    completed_at: float | None = None
    result: bytes | None = None
    polls: int = 0
    downloads: int = 0
    fetched: list[tuple[str, str]] = field(default_factory=list)
    generating: bool = field(default=False, repr=False)

    @property
    def outcome(self) -> Outcome:
        return self.rule.outcome

    @property
    def prompt(self) -> str:
        return str(self.params["prompt"])

    @property
    def file_name(self) -> str:
        return f"{self.task_id}.{'jpg' if self.result_format == 'jpeg' else 'png'}"

    def summary(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "outcome": self.outcome,
            "success_flag": self.success_flag,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "polls": self.polls,
            "downloads": self.downloads,
            "fetched": [list(item) for item in self.fetched],
        }


@dataclass(frozen=True)
class LoggedRequest:
    """One request as received: lower-cased headers, query, parsed JSON body (None if absent or not JSON)."""

    endpoint: Endpoint
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    ignored_fields: tuple[str, ...] = ()


class EnvelopeError(Exception):
    """A rejection carried in the envelope's ``code``."""

    def __init__(self, code: int, msg: str | None = None) -> None:
        super().__init__(msg or MESSAGES.get(code, "error"))
        self.code = code
        self.msg = msg or MESSAGES.get(code, "error")


class FetchFailed(Exception):
    """The fake could not download an input image."""


@dataclass
class _State:
    faults: dict[Endpoint, deque[NanobananaFault]] = field(
        default_factory=lambda: {"submit": deque(), "poll": deque(), "download": deque()}
    )
    rules: list[OutcomeRule] = field(default_factory=list)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    requests: list[LoggedRequest] = field(default_factory=list)
    submits_received: int = 0
    submits_accepted: int = 0
    polls: int = 0
    downloads: int = 0


class FakeNanobanana:
    """The fake NanoBanana API and file host; ``.app`` is the ASGI app. See the module docstring."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        public_base_url: str | None = None,
        *,
        fetch_transport: httpx.AsyncBaseTransport | None = None,
        fetch_timeout_s: float = 10.0,
        generation_s: float = 0.05,
        submit_latency_s: float = 0.0,
        poll_latency_s: float = 0.0,
        result_format: ResultFormat = "png",
        result_ttl_s: float | None = None,
        result_max_downloads: int | None = None,
        reject_private_urls: bool = False,
        envelope_errors: EnvelopeErrors = "http200",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_key = api_key
        self.public_base_url = public_base_url
        self.fetch_transport = fetch_transport
        self.fetch_timeout_s = fetch_timeout_s
        self.generation_s = generation_s
        self.submit_latency_s = submit_latency_s
        self.poll_latency_s = poll_latency_s
        self.result_format: ResultFormat = result_format
        self.result_ttl_s = result_ttl_s
        self.result_max_downloads = result_max_downloads
        self.reject_private_urls = reject_private_urls
        self.envelope_errors: EnvelopeErrors = envelope_errors
        self.clock = clock
        # State is touched from the server's thread and read from the test's: one lock, never held over await.
        self._lock = threading.Lock()
        self._state = _State()
        self.app = Starlette(
            routes=[
                Route(SUBMIT_PATH, self._submit, methods=["POST"]),
                Route(POLL_PATH, self._poll, methods=["GET"]),
                Route("/files/{name}", self._download, methods=["GET"]),
                Route("/__admin/enqueue", self._admin_enqueue, methods=["POST"]),
                Route("/__admin/outcome", self._admin_outcome, methods=["POST"]),
                Route("/__admin/stats", self._admin_stats, methods=["GET"]),
                Route("/__admin/requests", self._admin_requests, methods=["GET"]),
                Route("/__admin/reset", self._admin_reset, methods=["POST"]),
                Route("/__admin/configure", self._admin_configure, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -- test-facing API ---------------------------------------------------------------------------------------

    def enqueue(self, endpoint: Endpoint, fault: NanobananaFault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests to ``endpoint``."""
        if endpoint not in ("submit", "poll", "download"):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        only = _ENDPOINT_ONLY.get(type(fault))
        if (only is not None and only != endpoint) or (isinstance(fault, BodyCode) and endpoint == "download"):
            raise ValueError(f"{type(fault).__name__} does not apply to {endpoint}")
        with self._lock:
            self._state.faults[endpoint].extend([fault] * times)

    def outcome_for(
        self,
        *,
        outcome: Outcome,
        prompt_contains: str | None = None,
        times: int | None = None,
        generation_s: float | None = None,
        error_code: int | None = 500,
        error_message: str | None = "Image generation failed (fake)",
        result_ttl_s: float | None = None,
        result_max_downloads: int | None = None,
    ) -> OutcomeRule:
        """Decide at submit time how matching tasks end (first matching rule wins; ``times`` caps its uses)."""
        if outcome not in get_args(Outcome):
            raise ValueError(f"unknown outcome {outcome!r}")
        rule = OutcomeRule(
            outcome=outcome,
            prompt_contains=prompt_contains,
            times=times,
            generation_s=generation_s,
            error_code=error_code,
            error_message=error_message,
            result_ttl_s=result_ttl_s,
            result_max_downloads=result_max_downloads,
        )
        with self._lock:
            self._state.rules.append(rule)
        return rule

    @property
    def submits_received(self) -> int:
        return self._state.submits_received

    @property
    def submits_accepted(self) -> int:
        return self._state.submits_accepted

    @property
    def polls(self) -> int:
        return self._state.polls

    @property
    def downloads(self) -> int:
        return self._state.downloads

    @property
    def tasks(self) -> dict[str, FakeTask]:
        with self._lock:
            return dict(self._state.tasks)

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._state.requests)

    def pending_faults(self, endpoint: Endpoint) -> int:
        return len(self._state.faults[endpoint])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            state = self._state
            return {
                "submits_received": state.submits_received,
                "submits_accepted": state.submits_accepted,
                "polls": state.polls,
                "downloads": state.downloads,
                "pending_faults": {name: len(queue) for name, queue in state.faults.items()},
                "tasks": {task_id: task.summary() for task_id, task in state.tasks.items()},
            }

    def reset(self) -> None:
        """Forget faults, rules, tasks, files, counters and the request log."""
        with self._lock:
            self._state = _State()

    # -- submit ----------------------------------------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        body = await request.body()
        parsed = _parse_json(body)
        ignored = tuple(sorted(set(parsed) - SUBMIT_FIELDS)) if isinstance(parsed, dict) else ()
        with self._lock:
            self._state.submits_received += 1
        fault = self._log_and_take_fault(request, "submit", parsed, ignored)
        if self.submit_latency_s > 0:
            await asyncio.sleep(self.submit_latency_s)
        interrupted = await self._play_fault(request, fault)
        if interrupted is not None:
            return interrupted
        try:
            self._check_auth(request)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise EnvelopeError(400, "Content-Type must be application/json")
            params = validate_submit(parsed)
        except EnvelopeError as exc:
            return self._error(exc)
        task = self._create_task(params)
        if isinstance(fault, AcceptThenDrop):
            return DroppedConnection()
        return _envelope(200, "success", {"taskId": task.task_id})

    def _create_task(self, params: dict[str, Any]) -> FakeTask:
        with self._lock:
            rule = next((r for r in self._state.rules if r.matches(params["prompt"])), None)
            if rule is None:
                rule = OutcomeRule(outcome="success")
            elif rule.times is not None:
                rule.times -= 1
            task = FakeTask(
                task_id=uuid.uuid4().hex,
                params=params,
                rule=rule,
                generation_s=self.generation_s if rule.generation_s is None else rule.generation_s,
                created_at=self.clock(),
                create_time=_wall_time(),
                result_format=self.result_format,
            )
            self._state.tasks[task.task_id] = task
            self._state.submits_accepted += 1
        return task

    # -- poll --------------------------------------------------------------------------------------------------------

    async def _poll(self, request: Request) -> Response:
        with self._lock:
            self._state.polls += 1
        fault = self._log_and_take_fault(request, "poll", None, ())
        if self.poll_latency_s > 0:
            await asyncio.sleep(self.poll_latency_s)
        interrupted = await self._play_fault(request, fault)
        if interrupted is not None:
            return interrupted
        try:
            self._check_auth(request)
            task_id = request.query_params.get("taskId")
            if not task_id:
                # The real API answers a missing taskId (including a snake_case task_id) with a server error.
                raise EnvelopeError(500, "Required request parameter 'taskId' is not present")
            with self._lock:
                task = self._state.tasks.get(task_id)
                if task is not None:
                    task.polls += 1
            if task is None:
                raise EnvelopeError(404, f"Task not found: {task_id}")
        except EnvelopeError as exc:
            return self._error(exc)
        await self._advance(task)
        return _envelope(200, "success", self._record_info(task, request))

    async def _advance(self, task: FakeTask) -> None:
        if task.success_flag != 0 or task.outcome == "never_finish":
            return
        if self.clock() - task.created_at < task.generation_s:
            return
        if task.generating:
            return  # another poll is generating it; this one still sees successFlag 0
        task.generating = True
        try:
            await self._generate(task)
        finally:
            task.generating = False

    async def _generate(self, task: FakeTask) -> None:
        rule = task.rule
        if task.outcome in ("fail", "create_failed"):
            self._finish(task, 2 if task.outcome == "create_failed" else 3, rule.error_code, rule.error_message)
            return
        sources: list[bytes] = []
        for url in task.params.get("imageUrls") or []:
            try:
                sources.append(await self._fetch(task, url))
            except FetchFailed as exc:
                self._finish(task, 2, 400, f"Failed to fetch image {url}: {exc}")
                return
        try:
            result = await asyncio.to_thread(
                render_result,
                sources[0] if sources else None,
                task.prompt,
                task.params.get("image_size"),
                task.result_format,
            )
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            self._finish(task, 3, 400, f"The input image could not be read: {exc}")
            return
        if task.outcome == "success":
            task.result = result
            with self._lock:
                self._state.files[task.file_name] = task.task_id
        self._finish(task, 1, 0, "")

    async def _fetch(self, task: FakeTask, url: str) -> bytes:
        if self.reject_private_urls and _is_private_host(urlsplit(url).hostname or ""):
            task.fetched.append((url, "refused: private address"))
            raise FetchFailed("the host is not publicly reachable")
        try:
            if self.fetch_transport is not None:
                # The transport is the caller's: a client wrapping it must not close it.
                client = httpx.AsyncClient(
                    transport=self.fetch_transport, timeout=self.fetch_timeout_s, follow_redirects=True
                )
                response = await client.get(url)
            else:
                async with httpx.AsyncClient(timeout=self.fetch_timeout_s, follow_redirects=True) as own_client:
                    response = await own_client.get(url)
        except httpx.HTTPError as exc:
            task.fetched.append((url, f"error: {type(exc).__name__}"))
            raise FetchFailed(type(exc).__name__) from exc
        task.fetched.append((url, str(response.status_code)))
        if not response.is_success:
            raise FetchFailed(f"HTTP {response.status_code}")
        return response.content

    def _finish(self, task: FakeTask, flag: int, error_code: int | None, error_message: str | None) -> None:
        task.success_flag = flag
        task.error_code = error_code
        task.error_message = error_message
        task.completed_at = self.clock()
        task.complete_time = _wall_time()

    def _record_info(self, task: FakeTask, request: Request) -> dict[str, Any]:
        response = None
        if task.success_flag == 1:
            base = (self.public_base_url or str(request.base_url)).rstrip("/")
            url = {
                "success": f"{base}/files/{task.file_name}",
                "url_404": f"{base}/files/expired-{task.file_name}",
            }.get(task.outcome, "")
            response = {"originImageUrl": None, "resultImageUrl": url}
        return {
            "taskId": task.task_id,
            "paramJson": json.dumps(task.params),
            "createTime": task.create_time,
            "completeTime": task.complete_time,
            "successFlag": task.success_flag,
            "response": response,
            "errorCode": task.error_code,
            "errorMessage": task.error_message,
        }

    # -- download ----------------------------------------------------------------------------------------------------

    async def _download(self, request: Request) -> Response:
        with self._lock:
            self._state.downloads += 1
        fault = self._log_and_take_fault(request, "download", None, ())
        interrupted = await apply_connection_fault(request, fault)
        if interrupted is not None:
            return interrupted
        if isinstance(fault, HttpError):
            headers = _retry_after(fault.retry_after)
            return PlainTextResponse(fault.msg or f"HTTP {fault.status}", status_code=fault.status, headers=headers)
        with self._lock:
            task_id = self._state.files.get(request.path_params["name"])
            task = self._state.tasks.get(task_id) if task_id else None
            if task is None or task.result is None or self._expired(task):
                return PlainTextResponse("Not Found", status_code=404)
            task.downloads += 1
            data = task.result
        media_type = "image/jpeg" if task.result_format == "jpeg" else "image/png"
        if isinstance(fault, CorruptDownload):
            data = data[: len(data) // 2]
        return Response(data, media_type=media_type)

    def _expired(self, task: FakeTask) -> bool:
        ttl = task.rule.result_ttl_s if task.rule.result_ttl_s is not None else self.result_ttl_s
        max_downloads = (
            task.rule.result_max_downloads if task.rule.result_max_downloads is not None else self.result_max_downloads
        )
        if ttl is not None and task.completed_at is not None and self.clock() - task.completed_at > ttl:
            return True
        return max_downloads is not None and task.downloads >= max_downloads

    # -- shared --------------------------------------------------------------------------------------------------------

    def _log_and_take_fault(
        self, request: Request, endpoint: Endpoint, parsed: Any, ignored: tuple[str, ...]
    ) -> NanobananaFault | None:
        logged = LoggedRequest(
            endpoint=endpoint,
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers=dict(request.headers),
            json=parsed,
            ignored_fields=ignored,
        )
        with self._lock:
            self._state.requests.append(logged)
            queue = self._state.faults[endpoint]
            return queue.popleft() if queue else None

    async def _play_fault(self, request: Request, fault: NanobananaFault | None) -> Response | None:
        interrupted = await apply_connection_fault(request, fault)
        if interrupted is not None:
            return interrupted
        if isinstance(fault, HttpError):
            code = fault.status if fault.code is None else fault.code
            return _envelope(
                code, fault.msg or MESSAGES.get(code, "error"), None, fault.status, _retry_after(fault.retry_after)
            )
        if isinstance(fault, BodyCode):
            return _envelope(
                fault.code, fault.msg or MESSAGES.get(fault.code, "error"), None, 200, _retry_after(fault.retry_after)
            )
        return None

    def _check_auth(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise EnvelopeError(401)

    def _error(self, exc: EnvelopeError) -> Response:
        status = exc.code if self.envelope_errors == "mirror" else 200
        return _envelope(exc.code, exc.msg, None, status)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _envelope(exc.status_code, str(exc.detail), None, exc.status_code)

    # -- admin -----------------------------------------------------------------------------------------------------

    async def _admin_enqueue(self, request: Request) -> Response:
        data = await request.json()
        try:
            for item in data if isinstance(data, list) else [data]:
                self.enqueue(item["endpoint"], fault_from_json(item), times=int(item.get("times", 1)))
        except (TypeError, ValueError, KeyError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(self.stats()["pending_faults"])

    async def _admin_outcome(self, request: Request) -> Response:
        try:
            rule = self.outcome_for(**await request.json())
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(asdict(rule))

    async def _admin_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse([asdict(r) for r in self.requests])

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse(self.stats())

    async def _admin_configure(self, request: Request) -> Response:
        settable: dict[str, Callable[[Any], Any]] = {
            "submit_latency_s": float,
            "poll_latency_s": float,
            "generation_s": float,
            "fetch_timeout_s": float,
            "result_ttl_s": _optional(float),
            "result_max_downloads": _optional(int),
            "public_base_url": _optional(str),
            "reject_private_urls": bool,
            "result_format": _choice(get_args(ResultFormat)),
            "envelope_errors": _choice(get_args(EnvelopeErrors)),
        }
        data = await request.json()
        unknown = set(data) - set(settable)
        if unknown:
            return JSONResponse({"error": f"unknown settings {sorted(unknown)}"}, status_code=400)
        try:
            for name, value in data.items():
                setattr(self, name, settable[name](value))
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({name: getattr(self, name) for name in settable})


# -- validation ------------------------------------------------------------------------------------------------------

SUBMIT_FIELDS = frozenset({"prompt", "type", "imageUrls", "callBackUrl", "numImages", "image_size"})


def validate_submit(body: Any) -> dict[str, Any]:
    """Check a submit body as the real API does; raise :class:`EnvelopeError` (code 400) on the first problem."""
    if not isinstance(body, dict):
        raise EnvelopeError(400, "The request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EnvelopeError(400, "prompt is required")
    task_type = body.get("type")
    if task_type not in TASK_TYPES:
        raise EnvelopeError(400, f"type must be IMAGETOIAMGE or TEXTTOIAMGE, got {task_type!r}")
    image_urls = body.get("imageUrls")
    if image_urls is not None or task_type == "IMAGETOIAMGE":
        if not isinstance(image_urls, list) or not image_urls:
            raise EnvelopeError(400, "imageUrls must be a non-empty list of image URLs")
        for url in image_urls:
            if not _is_http_url(url):
                raise EnvelopeError(400, f"imageUrls must hold http(s) URLs, got {str(url)[:80]!r}")
    callback = body.get("callBackUrl")
    if callback is None:
        raise EnvelopeError(400, "callBackUrl is required")
    if not _is_http_url(callback):
        raise EnvelopeError(400, "callBackUrl must be an http(s) URL")
    num_images = body.get("numImages")
    if num_images is not None and (
        not isinstance(num_images, int) or isinstance(num_images, bool) or not 1 <= num_images <= 4
    ):
        raise EnvelopeError(400, "numImages must be an integer from 1 to 4")
    image_size = body.get("image_size")
    if image_size is not None and image_size not in IMAGE_SIZES:
        raise EnvelopeError(400, f"image_size must be one of {' '.join(IMAGE_SIZES)}")
    return {name: body[name] for name in SUBMIT_FIELDS if name in body}


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_private_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local or address.is_unspecified


# -- rendering -------------------------------------------------------------------------------------------------------


def render_result(source: bytes | None, prompt: str, image_size: str | None, result_format: ResultFormat) -> bytes:
    """The "generated" scene: opaque RGB at Gemini's size, the input composited on a prompt-coloured backdrop.

    Raises ``OSError`` (Pillow's ``UnidentifiedImageError`` among them) if ``source`` is not an image.
    """
    image = None
    if source is not None:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(source)))
        image.load()
    if image_size is not None:
        size = IMAGE_SIZES[image_size]
    elif image is not None:
        size = _nearest_size(image.width / image.height)
    else:
        size = IMAGE_SIZES["1:1"]
    canvas = _backdrop(size, prompt)
    if image is not None:
        subject = image.convert("RGBA")
        subject.thumbnail((int(size[0] * 0.7), int(size[1] * 0.7)), Image.Resampling.LANCZOS)
        offset = ((size[0] - subject.width) // 2, (size[1] - subject.height) // 2)
        canvas.paste(subject.convert("RGB"), offset, mask=subject.getchannel("A"))
    buffer = io.BytesIO()
    if result_format == "jpeg":
        canvas.save(buffer, "JPEG", quality=90)
    else:
        canvas.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _nearest_size(ratio: float) -> tuple[int, int]:
    return min(IMAGE_SIZES.values(), key=lambda wh: abs(wh[0] / wh[1] - ratio))


def _backdrop(size: tuple[int, int], prompt: str) -> Image.Image:
    digest = hashlib.sha256(prompt.lower().encode()).digest()
    # Muted: halfway between the hashed colour and mid grey, darkening towards the bottom.
    top = (np.frombuffer(digest[:3], dtype=np.uint8).astype(np.float32) + 128.0) / 2.0
    shade = np.linspace(1.0, 0.7, size[1], dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * shade, (size[1], size[0], 3))
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


# -- responses -------------------------------------------------------------------------------------------------------


def _envelope(
    code: int, msg: str, data: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"code": code, "msg": msg, "data": data}, status_code=status_code, headers=headers)


def _retry_after(seconds: float | int | None) -> dict[str, str] | None:
    return None if seconds is None else {"Retry-After": str(seconds)}


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _wall_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {allowed}")
        return str(value)

    return check


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.fakes.nanobanana``: serve a fake on a port until interrupted (inputs fetched over HTTP)."""
    parser = argparse.ArgumentParser(description="A fake of the NanoBanana API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--public-base-url", default=None)
    parser.add_argument("--generation-s", type=float, default=0.05)
    parser.add_argument("--submit-latency-s", type=float, default=0.0)
    parser.add_argument("--result-format", choices=get_args(ResultFormat), default="png")
    args = parser.parse_args(argv)
    fake = FakeNanobanana(
        args.api_key,
        args.public_base_url,
        generation_s=args.generation_s,
        submit_latency_s=args.submit_latency_s,
        result_format=args.result_format,
    )
    serve_forever(fake.app, args.host, args.port)


if __name__ == "__main__":
    main()
