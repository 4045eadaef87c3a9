"""The image providers: the protocols the pipeline calls, the Reve and NanoBanana clients, and the retry policy.

Facts about both APIs come from `PROVIDERS.md`; the comments below flag the quirks they impose. Every request has a
timeout, retries are narrow (transport errors, 429, 5xx and the documented transient body codes) and bounded, and a
client never pays twice for one result: Reve is retried only on answers that were not billed, and a NanoBanana task
is never submitted again once it has an id.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import structlog
from pydantic import SecretStr

from config import VariantSpec
from errors import ProviderError, ProviderRejected, ProviderUnavailable
from retrying import RetryPolicy

log = structlog.get_logger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------------
# Protocols


@dataclass(frozen=True)
class CutoutResult:
    """A cut-out as returned by a provider: image bytes with an alpha channel, and the remover's confidence."""

    image: bytes
    confidence: float | None = None


@dataclass(frozen=True)
class VariantRequest:
    """What a generator needs for one styled shot: the cut-out both as bytes and as a publicly fetchable URL."""

    product_id: str
    spec: VariantSpec
    cutout_png: bytes
    cutout_url: str


TaskSubmitted = Callable[[str], Awaitable[None]]


class BackgroundRemover(Protocol):
    name: str

    async def remove_background(self, image: bytes) -> CutoutResult:
        """Cut the piece out of a photo. Raises `ProviderError`."""
        ...


class VariantGenerator(Protocol):
    name: str

    async def generate(self, request: VariantRequest, *, task_id: str | None, on_submitted: TaskSubmitted) -> bytes:
        """Render one styled shot and return its image bytes (any format Pillow reads). Raises `ProviderError`.

        Asynchronous providers call ``on_submitted(task_id)`` as soon as a billed task exists, so that the caller can
        save it; given a saved ``task_id`` they resume that task instead of submitting (and paying for) a new one.
        """
        ...


def _retry_after_s(response: httpx.Response) -> float | None:
    # Seconds, possibly fractional ("1.5"); the HTTP-date form is not used by these providers.
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _scrub(text: str, key: SecretStr) -> str:
    # Provider messages end up in rows and logs; one that quotes our key must not spread it.
    secret = key.get_secret_value()
    return text.replace(secret, "[redacted]") if secret else text


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Reve: background removal


class ReveClient:
    """Reve's image edit endpoint with the ``remove_background`` post-processing step (PROVIDERS.md §1)."""

    name = "reve"

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        api_key: SecretStr,
        base_url: str,
        prompt: str,
        version: str,
        retry: RetryPolicy,
        limiter: asyncio.Semaphore,
        timeout_s: float = 120.0,
        max_dim: int = 2048,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._url = f"{base_url.rstrip('/')}/v1/image/edit"
        self._prompt = prompt
        self._version = version
        self._retry = retry
        self._limiter = limiter
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._max_dim = max_dim

    async def remove_background(self, image: bytes) -> CutoutResult:
        payload = {
            "edit_instruction": self._prompt,
            "reference_image": base64.b64encode(image).decode("ascii"),
            "version": self._version,
            # fit_image first: it is free and caps the megapixels remove_background is billed for.
            "postprocessing": [{"process": "fit_image", "max_dim": self._max_dim}, {"process": "remove_background"}],
        }
        async with self._limiter:
            started = time.monotonic()
            body = await self._retry.run(lambda: self._post(payload))
        log.info(
            "reve_done",
            elapsed_ms=round((time.monotonic() - started) * 1000),
            request_id=body.get("request_id"),
            credits_used=body.get("credits_used"),
            credits_remaining=body.get("credits_remaining"),
        )
        # A content violation arrives as HTTP 200 with an empty image: it is a refusal, not a result.
        if body.get("content_violation"):
            raise ProviderRejected(self.name, "the image was refused as a content violation")
        encoded = body.get("image")
        if not isinstance(encoded, str) or not encoded:
            raise ProviderRejected(self.name, "the response held no image")
        try:
            return CutoutResult(image=base64.b64decode(encoded, validate=True))
        except ValueError as exc:
            raise ProviderRejected(self.name, "the response image is not valid base64") from exc

    async def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",  # never image/jpeg: it drops the alpha channel
        }
        try:
            response = await self._http.post(self._url, json=payload, headers=headers, timeout=self._timeout)
        except httpx.TransportError as exc:
            raise ProviderUnavailable(self.name, f"transport error: {type(exc).__name__}") from exc
        if response.status_code == 200:
            body = _json_or_none(response)
            if not isinstance(body, dict):
                raise ProviderRejected(self.name, "HTTP 200 without a JSON body", status_code=200)
            return body
        raise self._error(response)

    def _error(self, response: httpx.Response) -> ProviderError:
        body = _json_or_none(response)
        code = body.get("error_code") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        text = f"HTTP {response.status_code}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        text = _scrub(text, self._api_key)
        if response.status_code == 429 or response.status_code >= 500:
            return ProviderUnavailable(
                self.name, text, status_code=response.status_code, retry_after_s=_retry_after_s(response)
            )
        return ProviderRejected(self.name, text, status_code=response.status_code)


# ---------------------------------------------------------------------------------------------------------------------
# NanoBanana: styled variants

# Body codes that mean "try again later" (rate limit, maintenance, server errors); anything else is permanent.
_NANOBANA_TRANSIENT_CODES = frozenset({429, 455, 500, 501, 502, 503, 504, 505})


class NanobanaClient:
    """api.nanobananaapi.ai: submit an image-to-image task, poll it to a deadline, download the result at once."""

    name = "nanobana"

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        api_key: SecretStr,
        base_url: str,
        callback_url: str,
        retry: RetryPolicy,
        limiter: asyncio.Semaphore,
        poll_interval_s: float = 3.0,
        deadline_s: float = 240.0,
        timeout_s: float = 30.0,
        max_download_bytes: int = 40 * 1024 * 1024,
        https_only_downloads: bool = False,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._base = base_url.rstrip("/")
        self._callback_url = callback_url
        self._retry = retry
        self._limiter = limiter
        self._poll_interval_s = poll_interval_s
        self._deadline_s = deadline_s
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._max_download_bytes = max_download_bytes
        self._https_only = https_only_downloads
        self._hints: dict[str, asyncio.Event] = {}

    def notify(self, task_id: str) -> None:
        """A callback said this task changed: poll it now rather than at the next interval."""
        if event := self._hints.get(task_id):
            event.set()

    async def generate(self, request: VariantRequest, *, task_id: str | None, on_submitted: TaskSubmitted) -> bytes:
        # The limiter is held for the task's whole life so that N jobs never open more than N tasks at once.
        async with self._limiter:
            if task_id is None:
                task_id = await self._retry.run(lambda: self._submit(request))
                await on_submitted(task_id)
            else:
                log.info("nanobana_resume", task_id=task_id, variant=request.spec.index)
            result_url = await self._wait_for_result(task_id)
            return await self._retry.run(lambda: self._download(result_url))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}", "Accept": "application/json"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; returns the envelope's ``data``. Errors arrive as HTTP 200 with a body code, too."""
        try:
            response = await self._http.request(
                method, f"{self._base}{path}", headers=self._headers(), timeout=self._timeout, **kwargs
            )
        except httpx.TransportError as exc:
            raise ProviderUnavailable(self.name, f"transport error: {type(exc).__name__}") from exc
        body = _json_or_none(response)
        code = body.get("code") if isinstance(body, dict) else None
        message = body.get("msg") if isinstance(body, dict) else None
        if response.status_code == 200 and code == 200:
            return body.get("data") if isinstance(body, dict) else None
        status = code if response.status_code == 200 else response.status_code
        text = _scrub(f"HTTP {response.status_code}, code {code}" + (f": {message}" if message else ""), self._api_key)
        if not isinstance(status, int):
            raise ProviderRejected(self.name, f"HTTP {response.status_code} without an envelope")
        if status in _NANOBANA_TRANSIENT_CODES or status >= 500:
            raise ProviderUnavailable(self.name, text, status_code=status, retry_after_s=_retry_after_s(response))
        raise ProviderRejected(self.name, text, status_code=status)

    async def _submit(self, request: VariantRequest) -> str:
        payload = {
            "prompt": request.spec.prompt,
            "type": "IMAGETOIAMGE",  # sic: the API's own spelling
            "imageUrls": [request.cutout_url],
            "callBackUrl": self._callback_url,  # required by the API even though we poll
            "numImages": 1,
            "image_size": "1:1",
        }
        data = await self._call("POST", "/api/v1/nanobanana/generate", json=payload)
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            # Submitted and maybe billed, but without an id we cannot follow it: do not resubmit blindly.
            raise ProviderRejected(self.name, "the submit answer held no taskId")
        log.info("nanobana_submitted", task_id=task_id, variant=request.spec.index)
        return task_id

    async def _wait_for_result(self, task_id: str) -> str:
        deadline = time.monotonic() + self._deadline_s
        hint = self._hints.setdefault(task_id, asyncio.Event())
        try:
            while True:
                # A failed poll is retried by the policy; it never leads to a new submission.
                data = await self._retry.run(lambda: self._call("GET", "/api/v1/nanobanana/record-info",
                                                                params={"taskId": task_id}))
                if not isinstance(data, dict):
                    raise ProviderRejected(self.name, f"task {task_id}: record-info held no data")
                flag = data.get("successFlag")
                if flag == 1:
                    response = data.get("response")
                    url = response.get("resultImageUrl") if isinstance(response, dict) else None
                    if not isinstance(url, str) or not url:
                        raise ProviderRejected(self.name, f"task {task_id} succeeded without a result URL")
                    return url
                if flag in (2, 3):
                    reason = data.get("errorMessage") or data.get("errorCode") or "no reason given"
                    stage = "could not be created" if flag == 2 else "failed to generate"
                    raise ProviderRejected(self.name, f"task {task_id} {stage}: {reason}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProviderUnavailable(self.name, f"task {task_id} unfinished after {self._deadline_s:.0f}s")
                hint.clear()
                try:
                    await asyncio.wait_for(hint.wait(), timeout=min(self._poll_interval_s, remaining))
                except TimeoutError:
                    pass
        finally:
            self._hints.pop(task_id, None)

    async def _download(self, url: str) -> bytes:
        return await download_image(
            self._http,
            url,
            provider=self.name,
            max_bytes=self._max_download_bytes,
            https_only=self._https_only,
            http_timeout=self._timeout,
        )


async def download_image(
    http: httpx.AsyncClient,
    url: str,
    *,
    provider: str,
    max_bytes: int,
    https_only: bool,
    http_timeout: httpx.Timeout,
    max_redirects: int = 3,
) -> bytes:
    """Fetch a provider's result file: http(s) only, same-host redirects only, at most ``max_bytes``.

    No credentials are sent: result URLs live on the provider's file host, not its API.
    """
    allowed = ("https",) if https_only else ("http", "https")
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in allowed or not parts.hostname:
            raise ProviderRejected(provider, f"result URL not allowed: {parts.scheme}://{parts.hostname or ''}")
        try:
            async with http.stream("GET", url, timeout=http_timeout, follow_redirects=False) as response:
                if response.is_redirect:
                    target = urljoin(url, response.headers.get("location", ""))
                    if urlsplit(target).hostname != parts.hostname:
                        raise ProviderRejected(provider, "result URL redirects to another host")
                    url = target
                    continue
                if response.status_code in (408, 429) or response.status_code >= 500:
                    raise ProviderUnavailable(
                        provider, f"result download: HTTP {response.status_code}", status_code=response.status_code
                    )
                if response.status_code != 200:
                    # Result URLs are temporary: a 404 means it expired, and asking again will not bring it back.
                    raise ProviderRejected(provider, f"result download: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise ProviderRejected(provider, f"result is {declared} bytes, over the {max_bytes} cap")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ProviderRejected(provider, f"result is over the {max_bytes} byte cap")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TransportError as exc:
            raise ProviderUnavailable(provider, f"result download: {type(exc).__name__}") from exc
    raise ProviderRejected(provider, "result URL redirects too many times")
