"""The Reve and NanoBanana fakes, exercised with plain httpx (never with the service's clients)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import selectors
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes import nanobanana as nb
from tests.fakes import reve
from tests.fakes.nanobanana import AcceptThenDrop, BodyCode, CorruptDownload, FakeNanobanana
from tests.fakes.reve import ContentViolation, CorruptImage, FakeReve, HttpError, OpaqueCutout
from tests.fakes.server import Delay, Drop, Stall, serve_in_thread

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 15.0
REVE_URL = "https://api.reve.com"
NB_URL = "https://api.nanobananaapi.ai"
REVE_AUTH = {"Authorization": "Bearer papi.test-key"}
NB_AUTH = {"Authorization": "Bearer nb-test-key"}
INPUT_URL = "https://storage.test/raw/ring.png"
CALLBACK_URL = "https://example.com/nanobanana-callback"


# -- helpers -------------------------------------------------------------------------------------------------------


def photo(fmt: str = "JPEG", size: tuple[int, int] = (320, 240), mode: str = "RGB") -> bytes:
    """A gold ring on a plain pale backdrop."""
    image = Image.new(mode, size, (238, 236, 230) if mode == "RGB" else (238, 236, 230, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.3, h * 0.25, w * 0.7, h * 0.75), fill=(196, 152, 40))
    draw.ellipse((w * 0.4, h * 0.4, w * 0.6, h * 0.6), fill=(238, 236, 230))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def reve_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"edit_instruction": "Remove the background.", "reference_image": b64(photo())}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def nb_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "Stone: the ring on a slate slab",
        "type": "IMAGETOIAMGE",
        "imageUrls": [INPUT_URL],
        "callBackUrl": CALLBACK_URL,
        "numImages": 1,
        "image_size": "1:1",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


@asynccontextmanager
async def asgi_client(app: ASGIApp, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
        yield client


class ManualClock:
    """A clock the test moves, so generation and expiry need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def input_host(images: dict[str, bytes]) -> httpx.MockTransport:
    """Where the NanoBanana fake fetches its inputs in-process: path → bytes, else 404."""

    def handle(request: httpx.Request) -> httpx.Response:
        data = images.get(str(request.url))
        if data is None:
            return httpx.Response(404, text="no such object")
        return httpx.Response(200, content=data, headers={"content-type": "image/png"})

    return httpx.MockTransport(handle)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_nb(clock: ManualClock) -> Callable[..., FakeNanobanana]:
    def make(**kwargs: Any) -> FakeNanobanana:
        kwargs.setdefault("fetch_transport", input_host({INPUT_URL: photo("PNG")}))
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("generation_s", 10.0)
        return FakeNanobanana(**kwargs)

    return make


@pytest.fixture
def serve() -> Iterator[Callable[[ASGIApp], str]]:
    """Serve apps on loopback ports for one test; every server is stopped at teardown."""
    stops: list[Callable[[], None]] = []

    def start(app: ASGIApp) -> str:
        url, stop = serve_in_thread(app)
        stops.append(stop)
        return url

    yield start
    for stop in reversed(stops):
        stop()


async def submit(client: httpx.AsyncClient, **overrides: Any) -> str:
    response = await client.post("/api/v1/nanobanana/generate", json=nb_body(**overrides), headers=NB_AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["code"] == 200, response.text
    task_id: str = response.json()["data"]["taskId"]
    return task_id


async def poll(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get("/api/v1/nanobanana/record-info", params={"taskId": task_id}, headers=NB_AUTH)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert body["code"] == 200, body
    data: dict[str, Any] = body["data"]
    return data


# -- Reve: success shapes --------------------------------------------------------------------------------------------


async def test_reve_json_edit_returns_opaque_rgb_png_and_bills() -> None:
    fake = FakeReve(credits=1000)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post(
            "/v1/image/edit", json=reve_body(), headers={**REVE_AUTH, "Accept": "application/json"}
        )
        second = await client.post("/v1/image/edit/", json=reve_body(version="latest-fast"), headers=REVE_AUTH)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"image", "version", "content_violation", "request_id", "credits_used", "credits_remaining"}
    assert body["version"] == "reve-edit@20250915"
    assert body["content_violation"] is False
    assert body["request_id"].startswith("rsid-")
    assert (body["credits_used"], body["credits_remaining"]) == (30, 970)
    image = open_image(base64.b64decode(body["image"], validate=True))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (320, 240))
    # The edit model re-renders: pixels drift even where nothing was asked to change.
    assert image.getpixel((5, 5)) != (238, 236, 230)

    assert second.status_code == 200
    assert second.json()["version"] == "reve-edit-fast@20251030"
    assert (second.json()["credits_used"], second.json()["credits_remaining"]) == (5, 965)
    assert (fake.calls, fake.billed, fake.credits_remaining) == (2, 2, 965)
    assert [r.path for r in fake.requests] == ["/v1/image/edit", "/v1/image/edit/"]
    assert fake.requests[0].headers["authorization"] == "Bearer papi.test-key"
    assert fake.requests[0].json["edit_instruction"] == "Remove the background."


async def test_reve_remove_background_returns_real_alpha_of_the_same_size() -> None:
    fake = FakeReve()
    body = reve_body(postprocessing=[{"process": "remove_background"}])
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=body, headers=REVE_AUTH)

    cutout = open_image(base64.b64decode(response.json()["image"]))
    assert (cutout.format, cutout.mode, cutout.size) == ("PNG", "RGBA", (320, 240))
    alpha = cutout.getchannel("A")
    assert alpha.getpixel((2, 2)) == 0
    assert alpha.getpixel((160, 120)) == 0  # the ring's hole shows the backdrop
    assert alpha.getpixel((110, 120)) == 255  # the band
    assert sum(1 for count in alpha.histogram() if count) > 2  # a soft edge, not a hard mask


@pytest.mark.parametrize(
    ("accept", "media_type", "image_format", "mode"),
    [
        ("image/png", "image/png", "PNG", "RGBA"),
        ("image/webp", "image/webp", "WEBP", "RGBA"),
        ("image/*;q=0.9, application/json;q=0.1", "image/png", "PNG", "RGBA"),
        # Asking for JPEG is served as the real API would: the alpha is gone, and the client must notice.
        ("image/jpeg", "image/jpeg", "JPEG", "RGB"),
    ],
)
async def test_reve_image_modes_return_raw_bytes_with_reve_headers(
    accept: str, media_type: str, image_format: str, mode: str
) -> None:
    fake = FakeReve()
    body = reve_body(postprocessing=[{"process": "remove_background"}])
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=body, headers={**REVE_AUTH, "Accept": accept})

    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["x-reve-content-violation"] == "false"
    assert response.headers["x-reve-version"] == "reve-edit@20250915"
    assert response.headers["x-reve-request-id"].startswith("rsid-")
    assert (response.headers["x-reve-credits-used"], response.headers["x-reve-credits-remaining"]) == ("30", "970")
    image = open_image(response.content)
    assert (image.format, image.mode, image.size) == (image_format, mode, (320, 240))


async def test_reve_postprocessing_runs_in_order_and_aspect_ratio_reframes() -> None:
    fake = FakeReve()
    fit_then_cut = reve_body(
        reference_image=b64(photo("PNG", size=(1000, 500))),
        postprocessing=[{"process": "fit_image", "max_dim": 400}, {"process": "remove_background"}],
    )
    upscaled = reve_body(postprocessing=[{"process": "upscale", "upscale_factor": 2}])
    square = reve_body(aspect_ratio="1:1")
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        images = []
        for body in (fit_then_cut, upscaled, square):
            response = await client.post("/v1/image/edit", json=body, headers=REVE_AUTH)
            assert response.status_code == 200, response.text
            images.append(open_image(base64.b64decode(response.json()["image"])))

    assert [(i.mode, i.size) for i in images] == [("RGBA", (400, 200)), ("RGB", (640, 480)), ("RGB", (240, 240))]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "TIFF"])
async def test_reve_accepts_each_documented_input_format(fmt: str) -> None:
    fake = FakeReve()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post(
            "/v1/image/edit", json=reve_body(reference_image=b64(photo(fmt))), headers=REVE_AUTH
        )
    assert response.status_code == 200, response.text


async def test_reve_instruction_of_exactly_2560_characters_is_accepted() -> None:
    fake = FakeReve()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=reve_body(edit_instruction="x" * 2560), headers=REVE_AUTH)
    assert response.status_code == 200


# -- Reve: rejections ----------------------------------------------------------------------------------------------


def _bmp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "BMP")
    return buffer.getvalue()


def _blank_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("overrides", "status", "error_code"),
    [
        ({"prompt": "hi"}, 400, "UNKNOWN_FIELD"),
        ({"edit_instruction": ...}, 400, "MISSING_FIELD"),
        ({"reference_image": ...}, 400, "MISSING_FIELD"),
        ({"reference_image": None}, 400, "MISSING_FIELD"),
        ({"edit_instruction": 42}, 400, "INVALID_FIELD"),
        ({"edit_instruction": "   "}, 400, "INVALID_FIELD"),
        ({"edit_instruction": "x" * 2561}, 400, "PROMPT_TOO_LONG"),
        ({"version": "reve-edit@2024"}, 400, "INVALID_VERSION"),
        ({"aspect_ratio": "5:4"}, 400, "INVALID_ASPECT_RATIO"),
        ({"postprocessing": {"process": "remove_background"}}, 400, "INVALID_POSTPROCESSING"),
        ({"postprocessing": [{"process": "blur"}]}, 400, "INVALID_POSTPROCESSING"),
        ({"postprocessing": [{"process": "remove_background", "mode": "x"}]}, 400, "INVALID_POSTPROCESSING"),
        ({"postprocessing": [{"process": "fit_image"}]}, 400, "INVALID_POSTPROCESSING"),
        ({"postprocessing": [{"process": "fit_image", "max_dim": 0}]}, 400, "INVALID_POSTPROCESSING"),
        ({"postprocessing": [{"process": "upscale", "upscale_factor": 8}]}, 400, "INVALID_POSTPROCESSING"),
        ({"reference_image": "data:image/jpeg;base64," + b64(photo())}, 422, "INVALID_BASE64"),
        ({"reference_image": "not base64!"}, 422, "INVALID_BASE64"),
        ({"reference_image": b64(b"hello, not an image")}, 422, "INVALID_IMAGE"),
        ({"reference_image": b64(photo("PNG")[:300])}, 422, "INVALID_IMAGE"),
        ({"reference_image": b64(_bmp())}, 422, "UNSUPPORTED_IMAGE_FORMAT"),
        ({"reference_image": b64(_blank_png((8193, 1)))}, 400, "IMAGE_TOO_LARGE"),
        ({"reference_image": b64(_blank_png((6000, 6000)))}, 400, "IMAGE_TOO_LARGE"),
    ],
)
async def test_reve_rejects_what_the_real_api_rejects(overrides: dict[str, Any], status: int, error_code: str) -> None:
    fake = FakeReve()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=reve_body(**overrides), headers=REVE_AUTH)

    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error_code", "message", "params"}
    assert body["error_code"] == error_code
    assert response.headers["x-reve-error-code"] == error_code
    assert (fake.calls, fake.billed, fake.credits_remaining) == (1, 0, 1000)


@pytest.mark.parametrize(
    ("headers", "error_code"),
    [
        ({}, "UNAUTHORIZED"),
        ({"Authorization": "Bearer papi.wrong"}, "INVALID_API_KEY"),
        ({"Authorization": "papi.test-key"}, "INVALID_API_KEY"),
        ({"Authorization": "Basic papi.test-key"}, "INVALID_API_KEY"),
    ],
)
async def test_reve_rejects_a_missing_or_wrong_key(headers: dict[str, str], error_code: str) -> None:
    fake = FakeReve()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=reve_body(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error_code"] == error_code
    assert fake.billed == 0


async def test_reve_rejects_non_json_bodies_and_unacceptable_accept() -> None:
    fake = FakeReve()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        not_json = await client.post(
            "/v1/image/edit", content=b"{not json", headers={**REVE_AUTH, "Content-Type": "application/json"}
        )
        form = await client.post("/v1/image/edit", data={"edit_instruction": "x"}, headers=REVE_AUTH)
        html = await client.post("/v1/image/edit", json=reve_body(), headers={**REVE_AUTH, "Accept": "text/html"})
        unknown_path = await client.post("/v1/image/create", json=reve_body(), headers=REVE_AUTH)
        wrong_method = await client.get("/v1/image/edit", headers=REVE_AUTH)

    assert (not_json.status_code, not_json.json()["error_code"]) == (400, "INVALID_JSON")
    assert (form.status_code, form.json()["error_code"]) == (400, "INVALID_CONTENT_TYPE")
    assert (html.status_code, html.json()["error_code"]) == (406, "NOT_ACCEPTABLE")
    assert (unknown_path.status_code, unknown_path.json()["error_code"]) == (404, "NOT_FOUND")
    assert wrong_method.status_code == 405
    assert set(wrong_method.json()) == {"error_code", "message", "params"}
    assert fake.calls == 3  # the unknown path and the GET never reached the edit endpoint


async def test_reve_answers_402_when_credits_run_out() -> None:
    fake = FakeReve(credits=40)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        first = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        second = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        fast = await client.post("/v1/image/edit", json=reve_body(version="latest-fast"), headers=REVE_AUTH)

    assert first.status_code == 200
    assert (second.status_code, second.json()["error_code"]) == (402, "INSUFFICIENT_CREDITS")
    assert fast.json()["credits_remaining"] == 5
    assert (fake.calls, fake.billed) == (3, 2)


# -- Reve: faults --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 402, 404, 422, 500, 503])
async def test_reve_injected_http_errors_carry_the_error_body(status: int) -> None:
    fake = FakeReve()
    fake.enqueue(HttpError(status))
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        faulted = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        normal = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)

    assert faulted.status_code == status
    body = faulted.json()
    assert set(body) == {"error_code", "message", "params"}
    assert body["error_code"] == reve.DEFAULT_ERROR_CODES[status] == faulted.headers["x-reve-error-code"]
    assert normal.status_code == 200
    assert (fake.calls, fake.billed, fake.credits_remaining) == (2, 1, 970)


@pytest.mark.parametrize(("retry_after", "header"), [(3, "3"), (0.25, "0.25")])
async def test_reve_rate_limit_sends_retry_after(retry_after: float, header: str) -> None:
    fake = FakeReve()
    fake.enqueue(HttpError(429, retry_after=retry_after), times=2)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        responses = [await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH) for _ in range(3)]

    assert [r.status_code for r in responses] == [429, 429, 200]
    assert responses[0].headers["retry-after"] == header
    assert responses[0].json()["error_code"] == "RATE_LIMITED"
    assert (fake.calls, fake.billed) == (3, 1)


async def test_reve_content_violation_is_http_200_with_an_empty_image() -> None:
    fake = FakeReve()
    fake.enqueue(ContentViolation(), times=2)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        as_json = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        as_png = await client.post("/v1/image/edit", json=reve_body(), headers={**REVE_AUTH, "Accept": "image/png"})

    assert as_json.status_code == 200
    assert as_json.json()["content_violation"] is True
    assert as_json.json()["image"] == ""
    assert as_png.status_code == 200
    assert as_png.headers["x-reve-content-violation"] == "true"
    assert as_png.content == b""
    assert (fake.calls, fake.billed, fake.credits_remaining) == (2, 0, 1000)


@pytest.mark.parametrize("mode", ["truncated", "not_image", "invalid_base64"])
async def test_reve_corrupt_image_is_a_200_that_does_not_decode(mode: str) -> None:
    fake = FakeReve()
    fake.enqueue(CorruptImage(mode))  # type: ignore[arg-type]
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)

    assert response.status_code == 200
    encoded = response.json()["image"]
    with pytest.raises((OSError, ValueError)):
        open_image(base64.b64decode(encoded, validate=True))
    assert fake.billed == 1


async def test_reve_corrupt_image_in_image_mode() -> None:
    fake = FakeReve()
    fake.enqueue(CorruptImage("truncated"))
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=reve_body(), headers={**REVE_AUTH, "Accept": "image/png"})

    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")
    with pytest.raises(OSError):
        open_image(response.content)


async def test_reve_opaque_cutout_has_no_alpha_despite_remove_background() -> None:
    fake = FakeReve()
    fake.enqueue(OpaqueCutout())
    body = reve_body(postprocessing=[{"process": "remove_background"}])
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        response = await client.post("/v1/image/edit", json=body, headers=REVE_AUTH)

    image = open_image(base64.b64decode(response.json()["image"]))
    assert (image.format, image.mode) == ("PNG", "RGB")
    assert fake.billed == 1


async def test_reve_faults_are_consumed_in_order_then_normal() -> None:
    fake = FakeReve()
    for fault in (HttpError(503), HttpError(429, retry_after=1), ContentViolation(), HttpError(500)):
        fake.enqueue(fault)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        responses = [await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH) for _ in range(5)]

    assert [r.status_code for r in responses] == [503, 429, 200, 500, 200]
    assert responses[2].json()["content_violation"] is True
    assert responses[4].json()["content_violation"] is False
    assert (fake.calls, fake.billed, fake.pending_faults) == (5, 1, 0)


async def test_reve_drop_and_stall_surface_as_transport_errors_in_process() -> None:
    fake = FakeReve()
    fake.enqueue(Drop())
    fake.enqueue(Stall())
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        after = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)

    assert after.status_code == 200
    assert (fake.calls, fake.billed) == (3, 1)


async def test_reve_delay_and_latency_slow_the_answer() -> None:
    fake = FakeReve(latency_s=0.1)
    fake.enqueue(Delay(0.2))
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, REVE_URL) as client:
        started = time.monotonic()
        delayed = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        delayed_s = time.monotonic() - started
        started = time.monotonic()
        normal = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        normal_s = time.monotonic() - started

    assert (delayed.status_code, normal.status_code) == (200, 200)
    assert delayed_s >= 0.3
    assert 0.1 <= normal_s < delayed_s


# -- Reve: on a socket ---------------------------------------------------------------------------------------------


async def test_reve_over_loopback_success_drop_stall_and_delay(serve: Callable[[ASGIApp], str]) -> None:
    fake = FakeReve()
    base_url = serve(fake.app)
    assert base_url.startswith("http://127.0.0.1:")
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(base_url=base_url, timeout=0.5) as client:
        ok = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        fake.enqueue(Drop())
        with pytest.raises(httpx.TransportError):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        fake.enqueue(Stall())
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        fake.enqueue(Delay(2.0))
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        fake.enqueue(HttpError(429, retry_after=1.5))
        limited = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        after = await client.post("/v1/image/edit/", json=reve_body(), headers={**REVE_AUTH, "Accept": "image/webp"})

    assert ok.status_code == 200
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1.5")
    assert after.status_code == 200
    assert open_image(after.content).format == "WEBP"
    assert (fake.calls, fake.billed) == (6, 2)


# -- NanoBanana: submit ----------------------------------------------------------------------------------------------


async def test_nb_submit_returns_a_task_id_and_bills(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        response = await client.post("/api/v1/nanobanana/generate", json=nb_body(imageSize="3:4"), headers=NB_AUTH)

    assert response.status_code == 200
    body = response.json()
    assert (body["code"], body["msg"]) == (200, "success")
    task_id = body["data"]["taskId"]
    assert isinstance(task_id, str) and len(task_id) == 32
    assert (fake.submits_received, fake.submits_accepted) == (1, 1)
    assert fake.tasks[task_id].success_flag == 0
    assert fake.requests[0].ignored_fields == ("imageSize",)  # camelCase image size is silently ignored


async def test_nb_text_to_image_needs_no_image_urls(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client, type="TEXTTOIAMGE", imageUrls=..., image_size=...)
    assert fake.tasks[task_id].params["type"] == "TEXTTOIAMGE"


@pytest.mark.parametrize(
    "overrides",
    [
        {"prompt": ...},
        {"prompt": ""},
        {"prompt": 7},
        {"type": ...},
        {"type": "IMAGETOIMAGE"},  # the correct English spelling is not the API's
        {"type": "TEXTTOIMAGE"},
        {"type": "imagetoiamge"},
        {"imageUrls": ...},
        {"imageUrls": []},
        {"imageUrls": INPUT_URL},
        {"imageUrls": ["ftp://storage.test/ring.png"]},
        {"imageUrls": ["/raw/ring.png"]},
        {"imageUrls": ["data:image/png;base64,iVBORw0KGgo="]},
        {"imageUrls": [42]},
        {"callBackUrl": ...},
        {"callBackUrl": ""},
        {"numImages": 0},
        {"numImages": 5},
        {"numImages": "1"},
        {"numImages": True},
        {"image_size": "1:2"},
        {"image_size": "1024x1024"},
    ],
)
async def test_nb_submit_rejects_bad_parameters_with_body_code_400(
    make_nb: Callable[..., FakeNanobanana], overrides: dict[str, Any]
) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        response = await client.post("/api/v1/nanobanana/generate", json=nb_body(**overrides), headers=NB_AUTH)

    assert response.status_code == 200  # the error is only in the body
    body = response.json()
    assert (body["code"], body["data"]) == (400, None)
    assert body["msg"]
    assert (fake.submits_received, fake.submits_accepted) == (1, 0)


async def test_nb_mirror_mode_sends_errors_with_the_same_http_status(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb(envelope_errors="mirror")
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        bad = await client.post("/api/v1/nanobanana/generate", json=nb_body(type="IMAGETOIMAGE"), headers=NB_AUTH)
        unauthorised = await client.post("/api/v1/nanobanana/generate", json=nb_body())
        unknown = await client.get("/api/v1/nanobanana/record-info", params={"taskId": "nope"}, headers=NB_AUTH)

    assert (bad.status_code, bad.json()["code"]) == (400, 400)
    assert (unauthorised.status_code, unauthorised.json()["code"]) == (401, 401)
    assert (unknown.status_code, unknown.json()["code"]) == (404, 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "nb-test-key"}])
async def test_nb_rejects_a_missing_or_wrong_key(
    make_nb: Callable[..., FakeNanobanana], headers: dict[str, str]
) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        submitted = await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=headers)
        polled = await client.get("/api/v1/nanobanana/record-info", params={"taskId": "x"}, headers=headers)

    for response in (submitted, polled):
        assert response.status_code == 200
        assert (response.json()["code"], response.json()["data"]) == (401, None)
    assert fake.submits_accepted == 0


async def test_nb_submit_needs_a_json_body(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        form = await client.post("/api/v1/nanobanana/generate", data={"prompt": "x"}, headers=NB_AUTH)
        garbage = await client.post(
            "/api/v1/nanobanana/generate", content=b"[1,", headers={**NB_AUTH, "Content-Type": "application/json"}
        )
    assert [r.json()["code"] for r in (form, garbage)] == [400, 400]


# -- NanoBanana: poll and download ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result_format", "image_size", "size", "image_format"),
    [("png", "1:1", (1024, 1024), "PNG"), ("jpeg", "3:4", (864, 1184), "JPEG"), ("png", "16:9", (1344, 768), "PNG")],
)
async def test_nb_task_goes_from_generating_to_a_downloadable_rgb_image(
    make_nb: Callable[..., FakeNanobanana],
    clock: ManualClock,
    result_format: str,
    image_size: str,
    size: tuple[int, int],
    image_format: str,
) -> None:
    fake = make_nb(result_format=result_format)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client, image_size=image_size)
        generating = await poll(client, task_id)
        clock.advance(10.0)
        done = await poll(client, task_id)
        download = await client.get(done["response"]["resultImageUrl"])

    assert generating["successFlag"] == 0
    assert (generating["response"], generating["errorCode"], generating["errorMessage"]) == (None, None, None)
    assert generating["taskId"] == task_id
    assert '"image_size": "' + image_size + '"' in generating["paramJson"]
    assert done["successFlag"] == 1
    assert (done["errorCode"], done["errorMessage"]) == (0, "")
    assert done["completeTime"] and done["createTime"]
    url = done["response"]["resultImageUrl"]
    assert url.startswith(f"{NB_URL}/files/{task_id}.")
    assert download.status_code == 200
    image = open_image(download.content)
    assert (image.format, image.mode, image.size) == (image_format, "RGB", size)
    assert fake.tasks[task_id].fetched == [(INPUT_URL, "200")]
    assert (fake.polls, fake.downloads, fake.tasks[task_id].polls, fake.tasks[task_id].downloads) == (2, 1, 2, 1)


async def test_nb_without_image_size_keeps_the_inputs_ratio(
    make_nb: Callable[..., FakeNanobanana], clock: ManualClock
) -> None:
    wide_url = "https://storage.test/raw/wide.png"
    fake = make_nb(
        fetch_transport=input_host({wide_url: photo("PNG", size=(1600, 900))}), public_base_url="https://tempfile.test"
    )
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client, imageUrls=[wide_url], image_size=...)
        clock.advance(10.0)
        url = (await poll(client, task_id))["response"]["resultImageUrl"]
        assert url.startswith("https://tempfile.test/files/")
        download = await client.get(url)  # ASGITransport routes every host to the fake
    assert open_image(download.content).size == (1344, 768)


async def test_nb_poll_with_task_id_in_snake_case_is_a_body_500(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client)
        snake = await client.get("/api/v1/nanobanana/record-info", params={"task_id": task_id}, headers=NB_AUTH)
        missing = await client.get("/api/v1/nanobanana/record-info", headers=NB_AUTH)
        unknown = await client.get("/api/v1/nanobanana/record-info", params={"taskId": "0" * 32}, headers=NB_AUTH)

    assert [(r.status_code, r.json()["code"], r.json()["data"]) for r in (snake, missing, unknown)] == [
        (200, 500, None),
        (200, 500, None),
        (200, 404, None),
    ]
    assert fake.tasks[task_id].polls == 0


async def test_nb_input_that_cannot_be_fetched_fails_the_task(
    make_nb: Callable[..., FakeNanobanana], clock: ManualClock
) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route to host", request=request)

    fake = make_nb()
    not_image_url = "https://storage.test/raw/notes.txt"
    fake.fetch_transport = input_host({INPUT_URL: photo("PNG"), not_image_url: b"just text"})
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        missing = await submit(client, imageUrls=["https://storage.test/raw/gone.png"])
        second_missing = await submit(client, imageUrls=[INPUT_URL, "https://storage.test/raw/gone.png"])
        not_image = await submit(client, imageUrls=[not_image_url])
        clock.advance(10.0)
        results = [await poll(client, task_id) for task_id in (missing, second_missing, not_image)]
        fake.fetch_transport = httpx.MockTransport(unreachable)
        unreachable_task = await submit(client)
        clock.advance(10.0)
        results.append(await poll(client, unreachable_task))

    assert [r["successFlag"] for r in results] == [2, 2, 3, 2]
    assert all(r["errorMessage"] for r in results)
    assert all(r["response"] is None for r in results)
    assert "HTTP 404" in results[0]["errorMessage"]
    assert fake.tasks[unreachable_task].fetched == [(INPUT_URL, "error: ConnectError")]


async def test_nb_generates_once_while_concurrent_polls_still_see_it_generating(
    make_nb: Callable[..., FakeNanobanana], clock: ManualClock
) -> None:
    fetches = 0

    async def slow_input(request: httpx.Request) -> httpx.Response:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.2)
        return httpx.Response(200, content=photo("PNG"))

    fake = make_nb(fetch_transport=httpx.MockTransport(slow_input))
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client)
        clock.advance(10.0)
        generating = asyncio.ensure_future(poll(client, task_id))
        await asyncio.sleep(0.05)
        meanwhile = await poll(client, task_id)
        first = await generating
        after = await poll(client, task_id)

    assert (meanwhile["successFlag"], first["successFlag"], after["successFlag"]) == (0, 1, 1)
    assert fetches == 1


async def test_nb_can_refuse_private_input_urls(make_nb: Callable[..., FakeNanobanana], clock: ManualClock) -> None:
    fake = make_nb(reject_private_urls=True)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        loopback = await submit(client, imageUrls=["http://127.0.0.1:9000/raw/ring.png"])
        localhost = await submit(client, imageUrls=["http://localhost/raw/ring.png"])
        public = await submit(client)
        clock.advance(10.0)
        flags = [(await poll(client, task_id))["successFlag"] for task_id in (loopback, localhost, public)]
    assert flags == [2, 2, 1]


async def test_nb_outcome_rules_pick_the_failing_variant_whatever_the_order(
    make_nb: Callable[..., FakeNanobanana], clock: ManualClock
) -> None:
    fake = make_nb()
    fake.outcome_for(prompt_contains="Velvet", outcome="fail", error_code=501, error_message=None)
    prompts = ["Charcoal backdrop", "velvet cushion", "Stone slab", "Marble counter"]
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_ids = await asyncio.gather(*(submit(client, prompt=p) for p in prompts))
        clock.advance(10.0)
        results = await asyncio.gather(*(poll(client, t) for t in task_ids))
        downloads = await asyncio.gather(
            *(client.get(r["response"]["resultImageUrl"]) for r in results if r["successFlag"] == 1)
        )

    flags = {p: r["successFlag"] for p, r in zip(prompts, results, strict=True)}
    assert flags == {"Charcoal backdrop": 1, "velvet cushion": 3, "Stone slab": 1, "Marble counter": 1}
    velvet = results[1]
    assert (velvet["errorCode"], velvet["errorMessage"], velvet["response"]) == (501, None, None)
    assert [d.status_code for d in downloads] == [200, 200, 200]
    # Each variant's backdrop colour comes from its prompt.
    assert len({open_image(d.content).getpixel((2, 2)) for d in downloads}) == 3


async def test_nb_other_outcomes(make_nb: Callable[..., FakeNanobanana], clock: ManualClock) -> None:
    fake = make_nb()
    fake.outcome_for(prompt_contains="empty", outcome="success_empty_url")
    fake.outcome_for(prompt_contains="forever", outcome="never_finish")
    fake.outcome_for(prompt_contains="creation", outcome="create_failed", error_code=None, error_message="")
    fake.outcome_for(prompt_contains="gone", outcome="url_404")
    fake.outcome_for(prompt_contains="slow", outcome="success", generation_s=60.0)
    fake.outcome_for(prompt_contains="once", outcome="fail", times=1)
    prompts = ["empty", "forever", "creation", "gone", "slow", "once", "once"]
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_ids = [await submit(client, prompt=p) for p in prompts]
        clock.advance(10.0)
        results = [await poll(client, t) for t in task_ids]
        gone = await client.get(results[3]["response"]["resultImageUrl"])
        clock.advance(3600.0)
        later = [await poll(client, t) for t in task_ids]

    assert [r["successFlag"] for r in results] == [1, 0, 2, 1, 0, 3, 1]
    assert results[0]["response"]["resultImageUrl"] == ""
    assert (results[2]["errorCode"], results[2]["errorMessage"]) == (None, "")
    assert gone.status_code == 404
    assert [r["successFlag"] for r in later] == [1, 0, 2, 1, 1, 3, 1]
    assert [fake.tasks[t].outcome for t in task_ids][-2:] == ["fail", "success"]


async def test_nb_result_url_expires(make_nb: Callable[..., FakeNanobanana], clock: ManualClock) -> None:
    fake = make_nb(result_ttl_s=60.0)
    fake.outcome_for(prompt_contains="once", outcome="success", result_max_downloads=1)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        timed = await submit(client)
        once = await submit(client, prompt="download once")
        clock.advance(10.0)
        timed_url = (await poll(client, timed))["response"]["resultImageUrl"]
        once_url = (await poll(client, once))["response"]["resultImageUrl"]
        statuses = [(await client.get(timed_url)).status_code, (await client.get(once_url)).status_code]
        statuses.append((await client.get(once_url)).status_code)
        clock.advance(61.0)
        statuses.append((await client.get(timed_url)).status_code)

    assert statuses == [200, 200, 404, 404]
    assert fake.downloads == 4
    assert (fake.tasks[timed].downloads, fake.tasks[once].downloads) == (1, 1)


# -- NanoBanana: faults ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 402, 429, 455, 500, 501, 505])
@pytest.mark.parametrize("endpoint", ["submit", "poll"])
async def test_nb_body_code_faults_come_with_http_200(
    make_nb: Callable[..., FakeNanobanana], endpoint: str, code: int
) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client)
        fake.enqueue(endpoint, BodyCode(code))  # type: ignore[arg-type]
        if endpoint == "submit":
            faulted = await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=NB_AUTH)
        else:
            faulted = await client.get("/api/v1/nanobanana/record-info", params={"taskId": task_id}, headers=NB_AUTH)
        await poll(client, task_id)

    assert faulted.status_code == 200
    assert (faulted.json()["code"], faulted.json()["data"]) == (code, None)
    assert faulted.json()["msg"] == nb.MESSAGES[code]
    assert fake.submits_accepted == 1  # a faulted submit is not billed


@pytest.mark.parametrize(
    ("fault", "status", "retry_after"),
    [
        (nb.HttpError(429, retry_after=2), 429, "2"),
        (nb.HttpError(429, retry_after=0.5), 429, "0.5"),
        (nb.HttpError(500), 500, None),
        (nb.HttpError(503), 503, None),
        (BodyCode(429, retry_after=1), 200, "1"),
    ],
)
async def test_nb_http_error_faults_on_submit(
    make_nb: Callable[..., FakeNanobanana], fault: nb.NanobananaFault, status: int, retry_after: str | None
) -> None:
    fake = make_nb()
    fake.enqueue("submit", fault)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        faulted = await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=NB_AUTH)
        await submit(client)

    assert faulted.status_code == status
    assert faulted.json()["code"] != 200
    assert faulted.headers.get("retry-after") == retry_after
    assert (fake.submits_received, fake.submits_accepted) == (2, 1)


async def test_nb_transport_faults_per_endpoint(make_nb: Callable[..., FakeNanobanana], clock: ManualClock) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        fake.enqueue("submit", Drop())
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=NB_AUTH)
        assert fake.submits_accepted == 0

        fake.enqueue("submit", AcceptThenDrop())
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=NB_AUTH)
        assert fake.submits_accepted == 1  # billed although the client never saw the taskId

        task_id = await submit(client)
        fake.enqueue("poll", Stall())
        with pytest.raises(httpx.ReadTimeout):
            await poll(client, task_id)
        fake.enqueue("poll", nb.HttpError(503))
        unavailable = await client.get("/api/v1/nanobanana/record-info", params={"taskId": task_id}, headers=NB_AUTH)
        assert (unavailable.status_code, unavailable.json()["code"]) == (503, 503)
        fake.enqueue("poll", Delay(0.1))
        clock.advance(10.0)
        url = (await poll(client, task_id))["response"]["resultImageUrl"]

        fake.enqueue("download", Drop())
        fake.enqueue("download", nb.HttpError(503, retry_after=1))
        fake.enqueue("download", CorruptDownload())
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
        busy = await client.get(url)
        corrupt = await client.get(url)
        good = await client.get(url)

    assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
    assert corrupt.status_code == 200
    with pytest.raises(OSError):
        open_image(corrupt.content)
    assert open_image(good.content).mode == "RGB"
    assert (fake.submits_received, fake.submits_accepted, fake.polls, fake.downloads) == (3, 2, 3, 4)
    assert fake.tasks[task_id].downloads == 2  # the corrupt one and the good one


async def test_nb_enqueue_refuses_faults_that_do_not_fit_the_endpoint(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb()
    with pytest.raises(ValueError):
        fake.enqueue("poll", AcceptThenDrop())
    with pytest.raises(ValueError):
        fake.enqueue("submit", CorruptDownload())
    with pytest.raises(ValueError):
        fake.enqueue("download", BodyCode(500))
    with pytest.raises(ValueError):
        fake.outcome_for(outcome="explode")  # type: ignore[arg-type]


async def test_nb_latency_settings(make_nb: Callable[..., FakeNanobanana]) -> None:
    fake = make_nb(submit_latency_s=0.2, generation_s=0.3, clock=time.monotonic)
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        started = time.monotonic()
        task_id = await submit(client)
        assert time.monotonic() - started >= 0.2
        flags = [(await poll(client, task_id))["successFlag"]]
        await asyncio.sleep(0.35)
        flags.append((await poll(client, task_id))["successFlag"])
    assert flags == [0, 1]


async def test_nb_request_log(make_nb: Callable[..., FakeNanobanana], clock: ManualClock) -> None:
    fake = make_nb()
    async with asyncio.timeout(TIMEOUT_S), asgi_client(fake.app, NB_URL) as client:
        task_id = await submit(client)
        clock.advance(10.0)
        await client.get((await poll(client, task_id))["response"]["resultImageUrl"])

    log = fake.requests
    assert [(r.endpoint, r.method) for r in log] == [("submit", "POST"), ("poll", "GET"), ("download", "GET")]
    assert log[0].json == nb_body()
    assert log[0].headers["authorization"] == "Bearer nb-test-key"
    assert log[1].query == {"taskId": task_id}
    assert fake.stats()["tasks"][task_id]["success_flag"] == 1


# -- NanoBanana: on sockets ----------------------------------------------------------------------------------------


def _storage_app(objects: dict[str, bytes]) -> Starlette:
    async def get_object(request: Request) -> Response:
        data = objects.get(request.path_params["path"])
        if data is None:
            return Response(b"not found", status_code=404)
        return Response(data, media_type="image/png")

    return Starlette(routes=[Route("/public/{path:path}", get_object)])


async def test_nb_over_loopback_fetches_inputs_over_http(serve: Callable[[ASGIApp], str]) -> None:
    storage_url = serve(_storage_app({"raw/ring.png": photo("PNG")}))
    fake = FakeNanobanana(generation_s=0.0)
    fake.outcome_for(prompt_contains="Velvet", outcome="fail")
    base_url = serve(fake.app)
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        good = await submit(client, imageUrls=[f"{storage_url}/public/raw/ring.png"])
        missing = await submit(client, imageUrls=[f"{storage_url}/public/raw/nope.png"])
        velvet = await submit(client, prompt="Velvet")
        done = await poll(client, good)
        download = await client.get(done["response"]["resultImageUrl"])
        flags = [(await poll(client, t))["successFlag"] for t in (missing, velvet)]
        fake.enqueue("submit", Drop())
        with pytest.raises(httpx.TransportError):
            await client.post("/api/v1/nanobanana/generate", json=nb_body(), headers=NB_AUTH)

    assert done["successFlag"] == 1
    assert done["response"]["resultImageUrl"].startswith(f"{base_url}/files/")
    assert open_image(download.content).mode == "RGB"
    assert flags == [2, 3]
    assert fake.tasks[good].fetched == [(f"{storage_url}/public/raw/ring.png", "200")]


# -- separate processes and the admin endpoints ----------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Run ``python -m <module> --port 0`` and return its base URL; the processes are stopped at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(module: str) -> str:
        log = (tmp_path / f"{module}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log.close()
        processes.append(process)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=TIMEOUT_S):
                raise TimeoutError(f"{module} did not start")
        line = process.stdout.readline().decode().strip()
        assert line.startswith("READY http://127.0.0.1:"), line
        return line.removeprefix("READY ")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        assert process.stdout is not None
        process.stdout.close()


async def test_reve_in_its_own_process_is_steered_by_admin_endpoints(spawn: Callable[[str], str]) -> None:
    base_url = spawn("tests.fakes.reve")
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        queued = await client.post(
            "/__admin/enqueue",
            json=[
                {"kind": "http_error", "status": 429, "retry_after": 0.5},
                {"kind": "drop"},
                {"kind": "content_violation"},
            ],
        )
        assert queued.json()["pending_faults"] == 3
        limited = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        with pytest.raises(httpx.TransportError):
            await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        violation = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        ok = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        stats = (await client.get("/__admin/stats")).json()
        logged = (await client.get("/__admin/requests")).json()
        bad_kind = await client.post("/__admin/enqueue", json={"kind": "meteor"})
        configured = await client.post("/__admin/configure", json={"credits": 10})
        broke = await client.post("/v1/image/edit", json=reve_body(), headers=REVE_AUTH)
        reset = (await client.post("/__admin/reset")).json()

    assert (limited.status_code, limited.headers["retry-after"]) == (429, "0.5")
    assert violation.json()["content_violation"] is True
    assert ok.status_code == 200
    assert stats == {"calls": 4, "billed": 1, "credits_remaining": 970, "pending_faults": 0}
    assert len(logged) == 4 and logged[0]["json"]["edit_instruction"] == "Remove the background."
    assert bad_kind.status_code == 400
    assert configured.json()["credits_remaining"] == 10
    assert broke.status_code == 402
    assert reset == {"calls": 0, "billed": 0, "credits_remaining": 10, "pending_faults": 0}


async def test_nanobanana_in_its_own_process_is_steered_by_admin_endpoints(
    spawn: Callable[[str], str], serve: Callable[[ASGIApp], str]
) -> None:
    storage_url = serve(_storage_app({"raw/ring.png": photo("PNG")}))
    base_url = spawn("tests.fakes.nanobanana")
    image_urls = [f"{storage_url}/public/raw/ring.png"]
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        pending = await client.post(
            "/__admin/enqueue",
            json=[
                {"endpoint": "submit", "kind": "body_code", "code": 455},
                {"endpoint": "poll", "kind": "http_error", "status": 500},
            ],
        )
        assert pending.json() == {"submit": 1, "poll": 1, "download": 0}
        rule = await client.post("/__admin/outcome", json={"prompt_contains": "velvet", "outcome": "fail"})
        assert rule.json()["outcome"] == "fail"
        configured = await client.post("/__admin/configure", json={"generation_s": 0, "result_max_downloads": 1})
        assert configured.json()["result_max_downloads"] == 1
        maintenance = await client.post(
            "/api/v1/nanobanana/generate", json=nb_body(imageUrls=image_urls), headers=NB_AUTH
        )
        stone = await submit(client, imageUrls=image_urls)
        velvet = await submit(client, prompt="Velvet", imageUrls=image_urls)
        broken_poll = await client.get("/api/v1/nanobanana/record-info", params={"taskId": stone}, headers=NB_AUTH)
        done = await poll(client, stone)
        failed = await poll(client, velvet)
        first = await client.get(done["response"]["resultImageUrl"])
        second = await client.get(done["response"]["resultImageUrl"])
        stats = (await client.get("/__admin/stats")).json()
        logged = (await client.get("/__admin/requests")).json()
        bad = await client.post("/__admin/configure", json={"colour": "red"})
        reset = (await client.post("/__admin/reset")).json()

    assert (maintenance.status_code, maintenance.json()["code"]) == (200, 455)
    assert (broken_poll.status_code, broken_poll.json()["code"]) == (500, 500)
    assert (done["successFlag"], failed["successFlag"]) == (1, 3)
    assert (first.status_code, second.status_code) == (200, 404)
    assert open_image(first.content).mode == "RGB"
    assert {k: stats[k] for k in ("submits_received", "submits_accepted", "polls", "downloads")} == {
        "submits_received": 3,
        "submits_accepted": 2,
        "polls": 3,
        "downloads": 2,
    }
    assert stats["tasks"][stone]["fetched"] == [[image_urls[0], "200"]]
    assert [entry["endpoint"] for entry in logged].count("submit") == 3
    assert bad.status_code == 400
    assert (reset["submits_received"], reset["tasks"]) == (0, {})
