"""The Supabase Storage fake, driven through the real storage3 client (and plain httpx for the wire shapes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from storage3.exceptions import StorageApiError
from storage3.types import FileOptions
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from tests.fakes.supabase_storage import FakeStorage, StorageError

pytestmark = pytest.mark.asyncio

TIMEOUT_S = 15.0
SUPABASE_URL = "http://supabase.test"
SERVICE_KEY = "service-role-key"
ANON_KEY = "anon-key"
MAX_OBJECT_BYTES = 64 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PNG_OPTIONS: FileOptions = {"content-type": "image/png", "upsert": "true", "cache-control": "3600"}
PUBLIC_URL = f"{SUPABASE_URL}/storage/v1/object/public/products/p1/cutout.png"

Connect = Callable[..., Awaitable[AsyncClient]]


class ManualClock:
    """A clock the test moves, so expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock: ManualClock) -> FakeStorage:
    return FakeStorage(SERVICE_KEY, anon_key=ANON_KEY, max_object_bytes=MAX_OBJECT_BYTES, clock=clock)


@pytest.fixture
async def connect(fake: FakeStorage) -> AsyncIterator[Connect]:
    """Supabase clients on the in-process fake; their httpx clients are closed at teardown."""
    https: list[httpx.AsyncClient] = []

    async def make(key: str = SERVICE_KEY) -> AsyncClient:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url=SUPABASE_URL)
        https.append(http)
        return await acreate_client(SUPABASE_URL, key, options=AsyncClientOptions(httpx_client=http))

    yield make
    for http in https:
        await http.aclose()


@pytest.fixture
async def raw(fake: FakeStorage) -> AsyncIterator[httpx.AsyncClient]:
    """Plain httpx on the fake, for what a browser or CDN would see and for exact wire shapes."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url=SUPABASE_URL) as client:
        yield client


@pytest.fixture
def serve(fake: FakeStorage) -> Iterator[Callable[[], str]]:
    stops: list[Callable[[], None]] = []

    def start() -> str:
        url, stop = fake.serve_in_thread()
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


async def products(sb: AsyncClient, *, public: bool = True, **options: Any) -> None:
    # Any: the server also takes a file_size_limit like "1KB", which storage3's TypedDict does not allow.
    bucket_options: Any = {"public": public, **options}
    await sb.storage.create_bucket("products", options=bucket_options)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "apikey": key}


async def storage_error(operation: Awaitable[Any]) -> StorageApiError:
    with pytest.raises(StorageApiError) as caught:
        await operation
    return caught.value


# -- buckets ---------------------------------------------------------------------------------------------------


async def test_create_bucket_answers_its_name_and_a_duplicate_is_409_in_an_http_400(
    fake: FakeStorage, connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        created = await sb.storage.create_bucket("products", options={"public": True})
        duplicate = await storage_error(sb.storage.create_bucket("products", options={"public": True}))
        wire = await raw.post("/storage/v1/bucket", json={"name": "products"}, headers=auth(SERVICE_KEY))
        bucket = await sb.storage.get_bucket("products")
        listed = await sb.storage.list_buckets()

    assert created == {"name": "products"}
    assert fake.calls("POST", "/bucket")[0].json == {"id": "products", "name": "products", "public": True}
    assert (duplicate.status, duplicate.code, duplicate.message) == ("409", "Duplicate", "The resource already exists")
    assert wire.status_code == 400
    assert wire.json() == {
        "statusCode": "409",
        "code": "BucketAlreadyExists",
        "error": "Duplicate",
        "message": "The resource already exists",
    }
    assert (bucket.id, bucket.public, bucket.owner, bucket.file_size_limit) == ("products", True, "", None)
    assert [b.id for b in listed] == ["products"]


async def test_delete_bucket_is_refused_while_objects_remain(connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        await sb.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)
        not_empty = await storage_error(sb.storage.delete_bucket("products"))
        emptied = await sb.storage.empty_bucket("products")
        deleted = await sb.storage.delete_bucket("products")
        gone = await storage_error(sb.storage.get_bucket("products"))

    assert (not_empty.status, not_empty.code) == ("409", "ResourceNotEmpty")
    assert emptied == {"message": "Successfully emptied"}
    assert deleted == {"message": "Successfully deleted"}
    assert (gone.status, gone.code, gone.message) == ("404", "Bucket not found", "Bucket not found")


async def test_a_bucket_size_limit_above_the_global_one_is_refused(connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        refused = await storage_error(products(sb, file_size_limit=MAX_OBJECT_BYTES + 1))
        await products(sb, file_size_limit="1KB")
        bucket = await sb.storage.get_bucket("products")

    assert (refused.status, refused.code) == ("413", "Payload too large")
    assert bucket.file_size_limit == 1000


# -- uploads ---------------------------------------------------------------------------------------------------


async def test_upload_sends_multipart_with_the_string_upsert_and_the_declared_type_is_stored(
    fake: FakeStorage, connect: Connect
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        uploaded = await sb.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)

    assert (uploaded.path, uploaded.full_path) == ("p1/cutout.png", "products/p1/cutout.png")
    [sent] = fake.calls("POST", "/object/")
    assert sent.path == "/object/products/p1/cutout.png"
    assert sent.headers["x-upsert"] == "true"
    assert sent.headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert sent.headers["apikey"] == SERVICE_KEY
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert sent.form == {"cacheControl": "3600"}
    assert (sent.file_name, sent.file_content_type) == ("cutout.png", "image/png")
    stored = fake.get_object("products", "p1/cutout.png")
    assert stored is not None
    assert (stored.data, stored.content_type, stored.cache_control) == (PNG, "image/png", "max-age=3600")
    assert fake.object_paths("products") == ["p1/cutout.png"]


async def test_upsert_true_overwrites_in_place_and_the_public_url_stays_the_same(
    fake: FakeStorage, connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        bucket_files = sb.storage.from_("products")
        await bucket_files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        first = fake.get_object("products", "p1/cutout.png")
        first_url = await bucket_files.get_public_url("p1/cutout.png")
        await bucket_files.upload("p1/cutout.png", PNG + b"v2", PNG_OPTIONS)
        second_url = await bucket_files.get_public_url("p1/cutout.png")
        served = await raw.get(second_url)

    second = fake.get_object("products", "p1/cutout.png")
    assert first is not None and second is not None
    assert first_url == second_url == PUBLIC_URL
    assert second.data == PNG + b"v2"
    # The row keeps its id; the version and the ETag change, which is why callers add ?v= to stored URLs.
    assert second.id == first.id
    assert (second.version, second.etag) != (first.version, first.etag)
    assert served.content == PNG + b"v2"


@pytest.mark.parametrize(
    ("options", "sent_x_upsert"),
    [
        ({"content-type": "image/png"}, "false"),
        ({"content-type": "image/png", "upsert": "True"}, "True"),
        ({"content-type": "image/png", "upsert": "false"}, "false"),
    ],
)
async def test_upload_without_the_exact_string_true_refuses_to_overwrite(
    fake: FakeStorage, connect: Connect, options: FileOptions, sent_x_upsert: str
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        await sb.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)
        refused = await storage_error(sb.storage.from_("products").upload("p1/cutout.png", b"other", options))

    assert (refused.status, refused.code, refused.message) == ("409", "Duplicate", "The resource already exists")
    assert fake.calls("POST", "/object/")[-1].headers["x-upsert"] == sent_x_upsert
    stored = fake.get_object("products", "p1/cutout.png")
    assert stored is not None and stored.data == PNG


async def test_a_bool_upsert_raises_in_storage3_before_anything_is_sent(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        bool_upsert: Any = {"upsert": True}
        with pytest.raises(AttributeError, match="'bool' object has no attribute 'encode'"):
            await sb.storage.from_("products").upload("p1/cutout.png", PNG, bool_upsert)
        # update() (PUT) drops x-upsert, so the same mistake passes silently there: PUT always overwrites.
        await sb.storage.from_("products").update("p1/cutout.png", PNG, bool_upsert)

    assert fake.call_count("POST", "/object/") == 0
    [put] = fake.calls("PUT", "/object/")
    assert "x-upsert" not in put.headers
    assert fake.object_paths("products") == ["p1/cutout.png"]


async def test_update_overwrites_and_also_creates(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        created = await files.update("p1/new.png", PNG, {"content-type": "image/png"})
        await files.update("p1/new.png", b"v2", {"content-type": "image/webp"})

    stored = fake.get_object("products", "p1/new.png")
    assert created.full_path == "products/p1/new.png"
    assert stored is not None and (stored.data, stored.content_type) == (b"v2", "image/webp")


async def test_a_missing_content_type_is_stored_as_text_plain(
    fake: FakeStorage, connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        await sb.storage.from_("products").upload("p1/cutout.png", PNG)
        served = await raw.get(PUBLIC_URL)
        # A raw (non-multipart) body keeps its Content-Type verbatim, or none at all.
        await raw.post("/storage/v1/object/products/raw.bin", content=b"abc", headers=auth(SERVICE_KEY))
        await raw.post(
            "/storage/v1/object/products/raw.txt",
            content=b"abc",
            headers={**auth(SERVICE_KEY), "content-type": "text/plain;charset=UTF-8", "cache-control": "max-age=60"},
        )

    assert fake.calls("POST", "/object/")[0].file_content_type == "text/plain;charset=UTF-8"
    assert served.headers["content-type"] == "text/plain"
    assert served.headers["cache-control"] == "max-age=3600"
    bin_object, txt_object = fake.get_object("products", "raw.bin"), fake.get_object("products", "raw.txt")
    assert bin_object is not None and txt_object is not None
    assert (bin_object.content_type, bin_object.cache_control) == ("application/octet-stream", "no-cache")
    assert (txt_object.content_type, txt_object.cache_control) == ("text/plain;charset=UTF-8", "max-age=60")


async def test_upload_to_a_missing_bucket_is_bucket_not_found(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        missing = await storage_error(sb.storage.from_("nowhere").upload("p1/cutout.png", PNG, PNG_OPTIONS))

    assert (missing.status, missing.code, missing.message) == ("404", "Bucket not found", "Bucket not found")
    assert fake.object_paths("nowhere") == []


async def test_an_object_over_the_size_limit_is_413(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        await files.upload("exact.bin", b"x" * MAX_OBJECT_BYTES, PNG_OPTIONS)
        too_large = await storage_error(files.upload("big.bin", b"x" * (MAX_OBJECT_BYTES + 1), PNG_OPTIONS))
        await sb.storage.create_bucket("small", options={"public": False, "file_size_limit": 10})
        over_bucket_limit = await storage_error(sb.storage.from_("small").upload("a.bin", b"x" * 11, PNG_OPTIONS))

    for error in (too_large, over_bucket_limit):
        assert (error.status, error.code) == ("413", "Payload too large")
        assert error.message == "The object exceeded the maximum allowed size"
    assert fake.object_paths("products") == ["exact.bin"]
    assert fake.object_paths("small") == []


async def test_an_invalid_key_is_refused(connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        refused = await storage_error(sb.storage.from_("products").upload("p1/ring#1.png", PNG, PNG_OPTIONS))

    assert (refused.status, refused.code, refused.message) == ("400", "InvalidKey", "Invalid key: p1/ring#1.png")


# -- downloads -------------------------------------------------------------------------------------------------


async def test_download_round_trips_the_bytes_and_a_missing_object_is_not_found(connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb, public=False)
        files = sb.storage.from_("products")
        await files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        downloaded = await files.download("p1/cutout.png")
        missing = await storage_error(files.download("p1/missing.png"))
        exists = (await files.exists("p1/cutout.png"), await files.exists("p1/missing.png"))

    assert downloaded == PNG
    assert (missing.status, missing.code, missing.message) == ("404", "not_found", "Object not found")
    assert exists == (True, False)


async def test_the_public_url_serves_anyone_the_bytes_with_the_stored_headers(
    connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        await sb.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)
        served = await raw.get(PUBLIC_URL)
        revalidated = await raw.get(PUBLIC_URL, headers={"If-None-Match": served.headers["etag"]})
        head = await raw.head(PUBLIC_URL)
        as_download = await raw.get(PUBLIC_URL, params={"download": "ring.png"})

    assert served.status_code == 200
    assert served.content == PNG
    assert served.headers["content-type"] == "image/png"
    assert served.headers["cache-control"] == "max-age=3600"
    assert served.headers["content-length"] == str(len(PNG))
    assert served.headers["etag"].startswith('"') and served.headers["etag"].endswith('"')
    assert "last-modified" in served.headers
    assert revalidated.status_code == 304
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(PNG)))
    assert as_download.headers["content-disposition"].startswith("attachment; filename=ring.png;")


async def test_the_public_url_of_a_private_bucket_or_missing_object_is_an_http_400(
    connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb, public=False)
        await sb.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)
        await sb.storage.create_bucket("open", options={"public": True})
        private = await raw.get(PUBLIC_URL)
        missing = await raw.get("/storage/v1/object/public/open/nothing.png")

    assert private.status_code == 400
    assert private.json() == {
        "statusCode": "404",
        "code": "NoSuchBucket",
        "error": "Bucket not found",
        "message": "Bucket not found",
    }
    assert missing.status_code == 400
    assert missing.json() == {
        "statusCode": "404",
        "code": "NoSuchKey",
        "error": "not_found",
        "message": "Object not found",
    }


# -- auth ------------------------------------------------------------------------------------------------------


async def test_the_anon_key_reads_public_objects_but_cannot_write(
    fake: FakeStorage, connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        service = await connect()
        await products(service)
        await service.storage.create_bucket("private", options={"public": False})
        await service.storage.from_("products").upload("p1/cutout.png", PNG, PNG_OPTIONS)
        await service.storage.from_("private").upload("secret.png", PNG, PNG_OPTIONS)

        anon = await connect(ANON_KEY)
        files = anon.storage.from_("products")
        upload = await storage_error(files.upload("p1/other.png", PNG, PNG_OPTIONS))
        overwrite = await storage_error(files.upload("p1/cutout.png", b"defaced", PNG_OPTIONS))
        bucket = await storage_error(anon.storage.create_bucket("mine", options={"public": True}))
        listed = await anon.storage.list_buckets()
        public_read = await files.download("p1/cutout.png")
        private_read = await storage_error(anon.storage.from_("private").download("secret.png"))
        removed = await files.remove(["p1/cutout.png"])
        public_url = await raw.get(PUBLIC_URL)

    for denied in (upload, overwrite, bucket):
        assert (denied.status, denied.code) == ("403", "Unauthorized")
        assert denied.message == "new row violates row-level security policy"
    assert listed == []
    assert public_read == PNG
    assert (private_read.status, private_read.code) == ("404", "not_found")
    assert removed == []
    assert public_url.content == PNG
    stored = fake.get_object("products", "p1/cutout.png")
    assert stored is not None and stored.data == PNG
    assert fake.object_paths("products") == ["p1/cutout.png"]


async def test_a_missing_or_foreign_key_is_refused_in_the_real_shape(connect: Connect, raw: httpx.AsyncClient) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        no_header = await raw.get("/storage/v1/bucket")
        not_a_jwt = await raw.get("/storage/v1/bucket", headers=auth("nope"))
        foreign_jwt = await raw.get("/storage/v1/bucket", headers=auth("aaa.bbb.ccc"))
        stranger = await connect("aaa.bbb.ccc")
        via_client = await storage_error(stranger.storage.list_buckets())

    assert no_header.status_code == 400
    assert no_header.json() == {
        "statusCode": "400",
        "error": "Error",
        "message": "headers must have required property 'authorization'",
    }
    assert not_a_jwt.status_code == 400
    assert not_a_jwt.json() == {
        "statusCode": "403",
        "code": "AccessDenied",
        "error": "Unauthorized",
        "message": "jwt malformed",
    }
    assert foreign_jwt.json()["message"] == "invalid signature"
    assert (via_client.status, via_client.code, via_client.message) == ("403", "Unauthorized", "invalid signature")


# -- remove, list, signed URLs ---------------------------------------------------------------------------------


async def test_remove_deletes_the_exact_names_and_answers_the_deleted_rows(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        await files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        await files.upload("p1/variant_1.png", PNG, PNG_OPTIONS)
        removed = await files.remove(["p1/cutout.png", "p1/missing.png", "p1"])
        gone = await storage_error(files.download("p1/cutout.png"))

    assert fake.calls("DELETE", "/object/products")[0].json == {"prefixes": ["p1/cutout.png", "p1/missing.png", "p1"]}
    assert [row["name"] for row in removed] == ["p1/cutout.png"]
    assert removed[0]["bucket_id"] == "products"
    assert removed[0]["metadata"]["mimetype"] == "image/png"
    assert fake.object_paths("products") == ["p1/variant_1.png"]
    assert (gone.status, gone.code) == ("404", "not_found")


async def test_list_answers_folders_then_files_one_level_below_the_prefix(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        for path in ("p1/b.png", "p1/a.png", "p1/variants/1.png", "p2/x.png"):
            await files.upload(path, PNG, PNG_OPTIONS)
        top = await files.list()
        inside = await files.list("p1")
        searched = await files.list("p1", {"search": "B"})
        first = await files.list("p1", {"limit": 1, "offset": 1})

    assert [(e["name"], e["id"]) for e in top] == [("p1", None), ("p2", None)]
    assert [e["name"] for e in inside] == ["variants", "a.png", "b.png"]
    assert inside[1]["metadata"]["mimetype"] == "image/png"
    assert inside[1]["metadata"]["size"] == len(PNG)
    assert [e["name"] for e in searched] == ["b.png"]
    assert [e["name"] for e in first] == ["a.png"]
    assert fake.calls("POST", "/object/list/")[0].json == {
        "limit": 100,
        "offset": 0,
        "sortBy": {"column": "name", "order": "asc"},
        "prefix": "",
    }


async def test_a_signed_url_serves_the_object_until_it_expires(
    clock: ManualClock, fake: FakeStorage, connect: Connect, raw: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb, public=False)
        files = sb.storage.from_("products")
        await files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        signed = await files.create_signed_url("p1/cutout.png", 60)
        url = signed["signedURL"]
        assert url is not None
        served = await raw.get(url)
        other_path = await raw.get(url.replace("p1/cutout.png", "p1/other.png"))
        tampered = await raw.get(url[:-2] + ("AA" if not url.endswith("AA") else "BB"))
        no_object = await storage_error(files.create_signed_url("p1/missing.png", 60))
        clock.advance(61)
        expired = await raw.get(url)

    assert url.startswith(f"{SUPABASE_URL}/storage/v1/object/sign/products/p1/cutout.png?token=")
    assert fake.calls("POST", "/object/sign/")[0].json == {"expiresIn": "60"}
    assert (served.status_code, served.content) == (200, PNG)
    assert "expires" in served.headers and "cache-control" not in served.headers
    assert other_path.json()["code"] == "InvalidSignature"
    assert tampered.json() == {
        "statusCode": "400",
        "code": "InvalidJWT",
        "error": "InvalidJWT",
        "message": "invalid signature",
    }
    assert (no_object.status, no_object.code) == ("404", "not_found")
    assert (expired.status_code, expired.json()["message"]) == (400, "jwt expired")


# -- faults ----------------------------------------------------------------------------------------------------


async def test_fail_next_answers_the_injected_errors_then_recovers(fake: FakeStorage, connect: Connect) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        fake.fail_next("POST", "/object/", times=2, status=500)
        first = await storage_error(files.upload("p1/cutout.png", PNG, PNG_OPTIONS))
        second = await storage_error(files.upload("p1/cutout.png", PNG, PNG_OPTIONS))
        await files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        fake.fail_next("POST", "/object/", error=StorageError.database_connection_limit())
        busy = await storage_error(files.upload("p1/cutout.png", PNG, PNG_OPTIONS))
        fake.fail_next("GET", "/object/products/", status=502)
        gateway = await storage_error(files.download("p1/cutout.png"))

    for error in (first, second):
        assert (error.status, error.code, error.message) == ("500", "InternalError", "Internal server error")
    assert (busy.status, busy.code) == ("503", "DatabaseConnectionLimit")
    # A gateway error has no storage body: storage3 falls back to the HTTP status, an int.
    assert (gateway.status, gateway.code) == (502, "InternalError")
    assert gateway.message.startswith("Unable to parse error message:")
    assert fake.call_count("POST", "/object/products/p1/cutout.png") == 4
    assert fake.pending_faults == 0
    assert fake.object_paths("products") == ["p1/cutout.png"]


async def test_disconnect_next_drops_the_connection_before_or_after_the_request_takes_effect(
    fake: FakeStorage, connect: Connect
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        sb = await connect()
        await products(sb)
        files = sb.storage.from_("products")
        fake.disconnect_next("POST", "/object/")
        with pytest.raises(httpx.RemoteProtocolError):
            await files.upload("p1/lost.png", PNG, PNG_OPTIONS)
        fake.disconnect_next("POST", "/object/", after_handling=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await files.upload("p1/landed.png", PNG, PNG_OPTIONS)

    assert fake.object_paths("products") == ["p1/landed.png"]
    assert fake.call_count("POST", "/object/") == 2


async def test_the_fake_serves_storage3_on_a_loopback_port(fake: FakeStorage, serve: Callable[[], str]) -> None:
    base_url = serve()
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient() as http:
        sb = await acreate_client(base_url, SERVICE_KEY, options=AsyncClientOptions(httpx_client=http))
        await products(sb)
        files = sb.storage.from_("products")
        await files.upload("p1/cutout.png", PNG, PNG_OPTIONS)
        public_url = await files.get_public_url("p1/cutout.png")
        served = await http.get(public_url)
        fake.disconnect_next("GET", "/object/public/")
        with pytest.raises(httpx.TransportError):
            await http.get(public_url)
        downloaded = await files.download("p1/cutout.png")

    assert public_url == f"{base_url}/storage/v1/object/public/products/p1/cutout.png"
    assert (served.content, served.headers["content-type"]) == (PNG, "image/png")
    assert downloaded == PNG


async def test_unknown_and_unimplemented_routes_say_so(raw: httpx.AsyncClient) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        unknown = await raw.get("/storage/v1/nothing", headers=auth(SERVICE_KEY))
        unimplemented = await raw.post("/storage/v1/object/move", json={}, headers=auth(SERVICE_KEY))

    assert (unknown.status_code, unknown.json()["statusCode"]) == (404, 404)
    assert unknown.json()["message"] == "Route GET:/nothing not found"
    assert unimplemented.status_code == 501
