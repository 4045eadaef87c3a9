"""Hostile and odd input through the real app: bad input is refused cleanly and leaves nothing behind, odd but valid
input comes out right.

The files are in ``tests/corpus`` (rebuilt by ``make_corpus.py``); ``manifest.json`` says what each one is, the
status its upload must get and, for accepted ones, what the stored raw JPEG must look like. Every file goes through
``POST /process`` in process (httpx ASGITransport, embedded stores, scripted providers) and every refusal through
``POST /process/{id}`` as well; then the whole manifest once more through a real uvicorn process, with the body-size
limits over real sockets, because ASGITransport does not stream a body the way a socket does.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import re
import select
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from PIL import Image

import images
from errors import InputError
from main import MULTIPART_OVERHEAD_BYTES, create_app
from pipeline import Services
from tests.conftest import jpeg_bytes, ring_photo
from tests.service_process import ServiceProcess, stopped_cleanly

CORPUS = Path(__file__).resolve().parent / "corpus"
ENTRIES: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))["entries"]
REFUSED = [entry for entry in ENTRIES if entry["status"] >= 400]
ACCEPTED = [entry for entry in ENTRIES if entry["status"] == 202]
BOMBS = [entry for entry in ENTRIES if entry.get("bomb")]

UPLOAD_LIMIT = 300_000  # MAX_UPLOAD_BYTES for these tests: above every corpus file, cheap to exceed
REQUEST_TIMEOUT_S = 30.0
MAX_TITLE_CHARS = 200
# Printable and not: BEL, ESC, a colour escape, CR LF, an emoji with a skin tone and a ZWJ sequence, Arabic (RTL),
# a right-to-left override, a combining accent, a zero-width space, a mathematical letter outside the BMP.
EXOTIC = "Ring \x07\x1b[31m red\x1b[0m\r\nline 2 \U0001f48d\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469 خاتم ذهب " \
         "\u202egnir\u202c e\u0301 zero\u200bwidth \U0001d518"


def params(entries: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(entry, id=entry["file"], marks=allowed_warnings(entry)) for entry in entries]


def allowed_warnings(entry: dict[str, Any]) -> list[pytest.MarkDecorator]:
    # Pillow warns about some damaged metadata (and goes on). Production shows that on stderr once; the test suite
    # turns warnings into errors, so the ones a manifest entry names are allowed for that entry only.
    warns = entry.get("pillow_warns")
    return [pytest.mark.filterwarnings(f"ignore:{re.escape(warns)}:UserWarning")] if warns else []


def corpus_bytes(entry: dict[str, Any]) -> bytes:
    return (CORPUS / entry["file"]).read_bytes()


# ---- checks shared by the in-process and the real-server tests -----------------------------------------------------


def assert_error_body(response: httpx.Response) -> None:
    """A 4xx says what to fix: ``{"detail": "<message>"}``, or FastAPI's list of field errors for request
    validation (422)."""
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"detail"}, body
    detail = body["detail"]
    if isinstance(detail, list):
        assert response.status_code == 422, body
        assert detail and all(item["msg"] and item["loc"] for item in detail), body
    else:
        assert isinstance(detail, str) and len(detail.strip()) >= 10, body


def assert_refusal(entry: dict[str, Any], response: httpx.Response) -> None:
    assert response.status_code == entry["status"], f"{entry['what']}: {response.status_code} {response.text}"
    assert_error_body(response)
    detail = response.json()["detail"]
    if entry["status"] == 415:
        assert "JPEG" in detail or "still photo" in detail, detail  # names what to send instead
    if entry.get("bomb"):
        assert re.search(r"pixels|image size", detail), detail  # says it is too big, not merely unreadable


def jpeg_markers(jpeg: bytes) -> list[int]:
    """The marker codes of a JPEG's header segments, up to the start of scan."""
    markers, at = [], 2
    while at + 4 <= len(jpeg) and jpeg[at] == 0xFF:
        marker = jpeg[at + 1]
        if marker == 0xDA:
            break
        markers.append(marker)
        at += 2 + int.from_bytes(jpeg[at + 2: at + 4], "big")
    return markers


def assert_stored_raw(raw: bytes, expected: dict[str, Any]) -> None:
    """The stored raw is a fresh upright sRGB JPEG with nothing of the upload but its pixels."""
    image = Image.open(io.BytesIO(raw))
    assert image.format == "JPEG" and image.mode == "RGB", (image.format, image.mode)
    assert image.size == (expected["width"], expected["height"])
    # Only the JFIF header (APP0) and the image tables: no EXIF/XMP (APP1), ICC/MPF (APP2), comments (COM).
    extra = {hex(m) for m in jpeg_markers(raw) if m == 0xFE or (0xE1 <= m <= 0xEF)}
    assert not extra, f"metadata segments survived: {sorted(extra)}"
    assert not image.getexif(), "EXIF must be stripped"
    assert not {"icc_profile", "exif", "xmp", "comment"} & set(image.info), set(image.info)
    for text in expected["absent"]:
        assert text.encode() not in raw, f"{text!r} survived into the stored raw"
    rgb = image.convert("RGB")
    for spot in expected["probes"]:
        x, y = spot["xy"]
        got = rgb.getpixel((x, y))
        assert isinstance(got, tuple)
        assert max(abs(a - b) for a, b in zip(got, spot["rgb"], strict=True)) <= spot["tol"], (
            f"pixel {x},{y} is {got}, expected {tuple(spot['rgb'])} ± {spot['tol']}")


# ---- the app in process ------------------------------------------------------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    services: Services

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await self.client.request(method, url, **kwargs)

    async def upload(self, data: bytes, *, content_type: str = "image/jpeg", filename: str = "photo.jpg",
                     url: str = "/process", **form: str) -> httpx.Response:
        return await self.request("POST", url, files={"file": (filename, data, content_type)}, data=form)

    async def upload_entry(self, entry: dict[str, Any], url: str = "/process") -> httpx.Response:
        return await self.upload(corpus_bytes(entry), content_type=entry["content_type"],
                                 filename=entry.get("filename", entry["file"]), url=url)

    def stored_files(self) -> dict[str, bytes]:
        """Every file under the storage folder, temporary ones included."""
        root = self.services.settings.data_dir / "storage"
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    async def product_ids(self) -> list[str]:
        response = await self.request("GET", "/products", params={"limit": 100})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    async def assert_nothing_stored(self) -> None:
        assert self.stored_files() == {}
        assert await self.product_ids() == []

    def raw_path(self, product_id: str) -> str:
        layout = self.services.layout
        return f"{layout.raw_bucket}/{layout.raw_path(UUID(product_id))}"


@pytest.fixture
async def make_api(make_services: Any) -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    async def make(**overrides: Any) -> Api:
        services = await make_services(**{"max_upload_bytes": UPLOAD_LIMIT, "rate_limit_per_minute": 0,
                                          "max_title_chars": MAX_TITLE_CHARS, **overrides})
        # A crash is a status here (500), not an exception in the test: a refusal must never be one.
        transport = httpx.ASGITransport(app=create_app(services=services), raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=REQUEST_TIMEOUT_S)
        clients.append(client)
        return Api(client=client, services=services)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def api(make_api: Any) -> Api:
    return await make_api()  # type: ignore[no-any-return]


def test_the_corpus_matches_its_manifest() -> None:
    on_disk = {p.name for p in CORPUS.iterdir() if p.is_file()} - {"manifest.json", "make_corpus.py"}
    assert on_disk == {entry["file"] for entry in ENTRIES}
    total = 0
    for entry in ENTRIES:
        data = corpus_bytes(entry)
        total += len(data)
        assert len(data) == entry["bytes"], entry["file"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{entry['file']}: run make_corpus.py"
        if "stored" in entry:
            assert entry["status"] == 202
    assert total < 512 * 1024, "keep the corpus small: generate big bodies in the tests"
    p3 = next(entry for entry in ENTRIES if entry["file"] == "display_p3.jpg")
    converted, unconverted = p3["stored"]["probes"][0]["rgb"], p3["unconverted_rgb"]
    assert max(abs(a - b) for a, b in zip(converted, unconverted, strict=True)) > 3 * p3["stored"]["probes"][0]["tol"]


@pytest.mark.parametrize("entry", params(REFUSED))
async def test_a_refused_upload_stores_nothing(api: Api, entry: dict[str, Any]) -> None:
    response = await api.upload_entry(entry)
    assert_refusal(entry, response)
    await api.assert_nothing_stored()


@pytest.mark.parametrize("entry", params(ACCEPTED))
async def test_an_accepted_upload_is_stored_upright_clean_and_right(api: Api, entry: dict[str, Any]) -> None:
    response = await api.upload_entry(entry)
    assert response.status_code == 202, f"{entry['what']}: {response.status_code} {response.text}"
    body = response.json()
    product_id = body["product_id"]
    assert response.headers["location"] == f"/product/{product_id}"
    # Exactly one file, at the product's raw path, whatever the upload was called.
    assert list(api.stored_files()) == [api.raw_path(product_id)]

    row = (await api.request("GET", f"/product/{product_id}")).json()
    assert row["status"] == "pending" and row["raw_image_url"] == body["raw_image_url"]
    served = await api.request("GET", httpx.URL(body["raw_image_url"]).path)
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
    assert served.content == api.stored_files()[api.raw_path(product_id)]
    assert_stored_raw(served.content, entry["stored"])


@pytest.mark.parametrize("entry", params(REFUSED))
async def test_a_refused_new_photo_leaves_the_product_as_it_was(api: Api, entry: dict[str, Any]) -> None:
    product_id = (await api.upload(ring_photo())).json()["product_id"]
    row_before = (await api.request("GET", f"/product/{product_id}")).json()
    files_before = api.stored_files()

    response = await api.upload_entry(entry, url=f"/process/{product_id}")
    assert_refusal(entry, response)
    assert (await api.request("GET", f"/product/{product_id}")).json() == row_before
    assert api.stored_files() == files_before


@pytest.mark.parametrize("entry", params(BOMBS))
async def test_a_bomb_is_refused_before_anything_is_decoded(api: Api, entry: dict[str, Any]) -> None:
    data = corpus_bytes(entry)
    images_before = Image.core.get_stats()["new_count"]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        response = await api.upload(data, content_type=entry["content_type"], filename=entry["file"])
    finally:
        elapsed_s = time.perf_counter() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert_refusal(entry, response)
    # Pillow counts every image it allocates: none was, so not one pixel of the bomb was decoded.
    assert Image.core.get_stats()["new_count"] == images_before, "Pillow allocated an image for the bomb"
    assert elapsed_s < 2.0, f"took {elapsed_s:.2f} s"
    assert peak_bytes < 16 * 2**20, f"Python allocated {peak_bytes:,} bytes at peak"
    await api.assert_nothing_stored()


MUTATION_SEEDS = ["exif_orientation_6.jpg", "progressive.jpg", "grey.png", "still.webp", "alpha.webp", "still.heic"]


# Pillow warns about some damaged metadata and carries on; this test is about what is raised.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed_file", MUTATION_SEEDS)
def test_a_mutated_photo_is_accepted_or_refused_never_a_crash(seed_file: str) -> None:
    """Seeded bit flips, truncations and splices of valid photos: each one is a stored JPEG or an `InputError`
    (a 4xx); anything else would be a 500."""
    original = (CORPUS / seed_file).read_bytes()
    rng = random.Random(seed_file)
    crashes: list[str] = []
    for _ in range(250):
        data = bytearray(original)
        match rng.randrange(4):
            case 0:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            case 1:
                data = data[: rng.randrange(len(data))]
            case 2:
                at = rng.randrange(len(data))
                data[at:at] = rng.randbytes(rng.randint(1, 16))
            case _:
                at = rng.randrange(len(data))
                data[at: at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        try:
            result = images.normalise_upload(bytes(data), max_pixels=40_000_000)
        except InputError:
            continue
        except Exception as exc:  # anything but our own refusal is the bug this test looks for
            crashes.append(f"{type(exc).__name__}: {str(exc)[:100]}")
            continue
        assert result.jpeg.startswith(b"\xff\xd8\xff")
    assert not crashes, f"{len(crashes)} of 250 mutants raised: {sorted(set(crashes))[:5]}"


# ---- bodies over the limit ----------------------------------------------------------------------------------------


async def test_a_body_declared_over_the_limit_is_413(api: Api) -> None:
    response = await api.upload(b"\xff" * (UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES + 1))
    assert response.status_code == 413
    assert_error_body(response)
    assert f"{UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES:,}" in response.json()["detail"]
    await api.assert_nothing_stored()


async def test_a_body_streamed_without_length_is_cut_off_at_the_limit(api: Api) -> None:
    boundary, chunk, chunks = "hostile", b"\xff" * 65536, 200  # 13 MB if nobody stops reading
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
               "Content-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(chunks):
            pulled += 1
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await api.request("POST", "/process", content=body(),
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert_error_body(response)
    assert pulled * len(chunk) < UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES + 2 * len(chunk), "read past the cap"
    await api.assert_nothing_stored()


async def test_a_file_one_byte_over_the_limit_is_413(api: Api) -> None:
    padded = ring_photo() + b"\x00" * UPLOAD_LIMIT
    response = await api.upload(padded[: UPLOAD_LIMIT + 1])
    assert response.status_code == 413
    assert_error_body(response)
    await api.assert_nothing_stored()


async def test_a_file_exactly_at_the_limit_is_accepted(api: Api) -> None:
    photo = ring_photo()
    response = await api.upload(photo + b"\x00" * (UPLOAD_LIMIT - len(photo)))  # zeros after EOI: still a JPEG
    assert response.status_code == 202, response.text


# ---- malformed requests ---------------------------------------------------------------------------------------------

MULTIPART = "multipart/form-data; boundary=zzz"
# Starlette leaves the temporary file of a part the body never finishes unclosed (it is dropped from the form and
# closed only when garbage-collected, with a ResourceWarning): allowed for that case only.
UNCLOSED_PART = [pytest.mark.filterwarnings("ignore::ResourceWarning"),
                 pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
MALFORMED = [
    pytest.param(400, {"content": b"--zzz\r\n\r\nx\r\n--zzz--\r\n", "headers": {"content-type": "multipart/form-data"}},
                 id="multipart without a boundary"),
    pytest.param(400, {"content": bytes(range(256)) * 4, "headers": {"content-type": MULTIPART}},
                 id="garbage under a multipart type"),
    pytest.param(422, {"content": b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
                                  + jpeg_bytes(), "headers": {"content-type": MULTIPART}},
                 id="a multipart part never closed", marks=UNCLOSED_PART),
    pytest.param(422, {"content": b"", "headers": {"content-type": MULTIPART}}, id="an empty multipart body"),
    pytest.param(422, {"files": {"title": (None, "a ring")}}, id="no file field, only a title"),
    pytest.param(422, {"files": {"file": (None, "not a file")}}, id="the file sent as a text field"),
    pytest.param(422, {"json": {"file": "aGVsbG8=", "title": "a ring"}}, id="a JSON body"),
    pytest.param(422, {"data": {"file": "hello"}}, id="a urlencoded form"),
    pytest.param(422, {"content": b"file=hello", "headers": {"content-type": "text/plain"}}, id="a text/plain body"),
    pytest.param(422, {}, id="no body at all"),
]


@pytest.mark.parametrize(("status", "request_kwargs"), MALFORMED)
async def test_a_malformed_request_is_a_4xx_and_stores_nothing(api: Api, status: int,
                                                               request_kwargs: dict[str, Any]) -> None:
    response = await api.request("POST", "/process", **request_kwargs)
    assert response.status_code == status, response.text
    assert_error_body(response)
    await api.assert_nothing_stored()


async def test_two_file_fields_are_refused(api: Api) -> None:
    # Starlette keeps the last `file` part: a client that sent two cannot know which one was processed.
    response = await api.request("POST", "/process", files=[("file", ("a.jpg", ring_photo(), "image/jpeg")),
                                                            ("file", ("b.jpg", jpeg_bytes(), "image/jpeg"))])
    assert response.status_code == 422, response.text
    assert_error_body(response)
    await api.assert_nothing_stored()


BAD_IDS = ["not-a-uuid", "123", "6f1b0d36-94a4-4c8e-9a55-0d1d3a4c2b1g", "6f1b0d36-94a4-4c8e-9a55",
           "6f1b0d36-94a4-4c8e-9a55-0d1d3a4c2b10-00", "' OR 1=1 --", "%00", "x" * 5000]


@pytest.mark.parametrize("product_id", BAD_IDS, ids=lambda value: value[:40])
async def test_a_malformed_id_is_422(api: Api, product_id: str) -> None:
    for method, kwargs in (("GET", {}), ("POST", {"files": {"file": ("a.jpg", ring_photo(), "image/jpeg")}})):
        response = await api.request(method, f"/product/{product_id}" if method == "GET" else f"/process/{product_id}",
                                     **kwargs)
        assert response.status_code == 422, (method, response.text)
        assert_error_body(response)
        assert response.json()["detail"][0]["loc"] == ["path", "product_id"]
    await api.assert_nothing_stored()


async def test_an_unknown_id_is_404_and_stores_nothing(api: Api) -> None:
    unknown = uuid4()
    for response in (await api.request("GET", f"/product/{unknown}"),
                     await api.upload(ring_photo(), url=f"/process/{unknown}")):
        assert response.status_code == 404
        assert_error_body(response)
        assert str(unknown) in response.json()["detail"]
    await api.assert_nothing_stored()


@pytest.mark.parametrize("spelling", [str.upper, lambda s: s.replace("-", ""), lambda s: f"urn:uuid:{s}"],
                         ids=["upper-case", "no-hyphens", "urn"])
async def test_other_spellings_of_an_id_find_the_product(api: Api, spelling: Any) -> None:
    product_id = (await api.upload(ring_photo())).json()["product_id"]
    response = await api.request("GET", f"/product/{spelling(product_id)}")
    assert response.status_code == 200 and response.json()["id"] == product_id


# ---- text fields --------------------------------------------------------------------------------------------------

TOO_LONG = {
    "title one over MAX_TITLE_CHARS": ({"title": "t" * (MAX_TITLE_CHARS + 1)}, "title"),
    "title over the form limit": ({"title": "t" * 10_001}, "title"),
    "jewellery_type one over 100": ({"jewellery_type": "r" * 101}, "jewellery_type"),
    "jewellery_type over the form limit": ({"jewellery_type": "r" * 10_001}, "jewellery_type"),
}


@pytest.mark.parametrize(("form", "field"), list(TOO_LONG.values()), ids=list(TOO_LONG))
async def test_over_long_text_is_422_and_stores_nothing(api: Api, form: dict[str, str], field: str) -> None:
    response = await api.upload(ring_photo(), **form)
    assert response.status_code == 422, response.text
    assert_error_body(response)
    assert field in json.dumps(response.json()["detail"])
    await api.assert_nothing_stored()


async def test_blank_text_falls_back_to_the_defaults(api: Api) -> None:
    product_id = (await api.upload(ring_photo(), title=" \t\r\n ", jewellery_type="   ")).json()["product_id"]
    row = (await api.request("GET", f"/product/{product_id}")).json()
    assert (row["title"], row["jewellery_type"]) == ("Untitled", None)


# ---- the same text rules on SQLite and on Supabase's PostgreSQL ---------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("supabase", marks=pytest.mark.integration)])
async def any_store_api(request: pytest.FixtureRequest, make_api: Any) -> AsyncIterator[Api]:
    if request.param == "sqlite":
        yield await make_api()
        return
    from database import SupabaseStore

    stack = request.getfixturevalue("supabase_stack")
    async with stack.supabase() as client:
        yield await make_api(store=SupabaseStore(client=client))


async def test_exotic_text_round_trips_exactly(any_store_api: Api) -> None:
    api = any_store_api
    jewellery_type = "خاتم \U0001f48d\x01"
    response = await api.upload(ring_photo(), title=EXOTIC, jewellery_type=jewellery_type)
    assert response.status_code == 202, response.text
    row = (await api.request("GET", f"/product/{response.json()['product_id']}")).json()
    assert (row["title"], row["jewellery_type"]) == (EXOTIC, jewellery_type)


@pytest.mark.parametrize("field", ["title", "jewellery_type"])
async def test_a_nul_character_is_refused_on_every_backend(any_store_api: Api, field: str) -> None:
    # PostgreSQL text cannot hold U+0000: PostgREST refuses the insert and the client got a 503 "try again shortly"
    # that no retry can fix, while SQLite stored it. Bad input is a 422, the same on both.
    api = any_store_api
    response = await api.upload(ring_photo(), **{field: "gold\x00ring"})
    assert response.status_code == 422, response.text
    assert_error_body(response)
    assert not any(name.endswith(".jpg") for name in api.stored_files())


# ---- a real server ------------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: ServiceProcess
    storage: Path

    def stored_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.storage)) for p in self.storage.rglob("*") if p.is_file())

    def product_count(self) -> int:
        response = httpx.get(f"{self.process.base_url}/products", params={"limit": 100}, timeout=REQUEST_TIMEOUT_S)
        return len(response.json()["items"])

    def peak_rss_bytes(self) -> int:
        assert self.process.process is not None
        status = Path(f"/proc/{self.process.process.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile")
    env = {"DATA_DIR": str(tmp / "data"), "RUN_WORKER": "false", "MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
           "RATE_LIMIT_PER_MINUTE": "0", "ENVIRONMENT": "development", "LOG_LEVEL": "WARNING"}
    process = ServiceProcess(env, log_path=tmp / "service.log").start()
    yield Server(process=process, storage=tmp / "data" / "storage")
    assert stopped_cleanly(process.stop()), process.logs()[-3000:]


@pytest.mark.parametrize("entry", params(ENTRIES))
def test_the_manifest_through_a_real_server(server: Server, entry: dict[str, Any]) -> None:
    files_before, products_before = server.stored_files(), server.product_count()
    response = httpx.post(f"{server.process.base_url}/process", timeout=REQUEST_TIMEOUT_S, files={
        "file": (entry.get("filename", entry["file"]), corpus_bytes(entry), entry["content_type"])})
    if entry["status"] >= 400:
        assert_refusal(entry, response)
        assert server.stored_files() == files_before
        assert server.product_count() == products_before
        return
    assert response.status_code == 202, f"{entry['what']}: {response.status_code} {response.text}"
    raw = httpx.get(response.json()["raw_image_url"], timeout=REQUEST_TIMEOUT_S)
    assert raw.status_code == 200
    assert_stored_raw(raw.content, entry["stored"])


def test_bombs_do_not_blow_up_the_server(server: Server) -> None:
    # Whatever order the tests ran in: the server idles near 100 MB, and a decoded bomb takes it past 900 MB.
    for entry in BOMBS:
        response = httpx.post(f"{server.process.base_url}/process", timeout=REQUEST_TIMEOUT_S,
                              files={"file": (entry["file"], corpus_bytes(entry), entry["content_type"])})
        assert response.status_code >= 400, (entry["file"], response.text)  # the exact status is checked above
    assert server.peak_rss_bytes() < 400 * 2**20, f"peak RSS {server.peak_rss_bytes():,} bytes"


def raw_exchange(server: Server, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request head, then body chunks until the server answers; return the response and bytes sent."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.process.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered (and stopped reading)
            try:
                sock.sendall(chunk)
            except OSError:  # reset or closed while we were still sending
                break
            sent += len(chunk)
        response = b""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while b"\r\n\r\n" not in response and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            response += data
    return response, sent


def head(server: Server, extra: str) -> bytes:
    return (f"POST /process HTTP/1.1\r\nHost: 127.0.0.1:{server.process.port}\r\n"
            f"Content-Type: multipart/form-data; boundary=zzz\r\n{extra}\r\n").encode()


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(server: Server) -> None:
    files_before = server.stored_files()
    response, sent = raw_exchange(server, head(server, "Content-Length: 50000000\r\n"), iter([]))
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent == 0
    assert server.stored_files() == files_before


def test_a_chunked_body_over_the_limit_is_cut_off(server: Server) -> None:
    files_before, products_before = server.stored_files(), server.product_count()
    part = (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    data = b"\xff" * 65536

    def chunks() -> Iterator[bytes]:
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for _ in range(320):  # 20 MB if nobody stops us
            yield f"{len(data):x}\r\n".encode() + data + b"\r\n"
            time.sleep(0.001)  # let the server's answer overtake us

    response, sent = raw_exchange(server, head(server, "Transfer-Encoding: chunked\r\n"), chunks())
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 4 * (UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES), f"sent {sent:,} bytes before the 413"
    assert server.stored_files() == files_before and server.product_count() == products_before


def test_a_file_just_over_the_limit_is_413_from_a_real_server(server: Server) -> None:
    files_before = server.stored_files()
    photo = ring_photo()
    response = httpx.post(f"{server.process.base_url}/process", timeout=REQUEST_TIMEOUT_S,
                          files={"file": ("big.jpg", photo + b"\x00" * (UPLOAD_LIMIT + 1 - len(photo)), "image/jpeg")})
    assert response.status_code == 413
    assert_error_body(response)
    assert server.stored_files() == files_before
