"""The image stores: Supabase Storage (through supabase-py/storage3 against a fake of its REST API built to
PROVIDERS.md) and the local folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from supabase import AsyncClientOptions, acreate_client

from errors import StorageError
from retrying import RetryPolicy
from storage import LocalImageStore, SupabaseImageStore
from tests.fakes.supabase_storage import FakeStorage

URL = "http://supabase.test"
KEY = "service-role-key"


@pytest.fixture
def fake() -> FakeStorage:
    return FakeStorage(service_role_key=KEY, anon_key="anon-key", max_object_bytes=1024 * 1024)


@pytest.fixture
async def remote(fake: FakeStorage) -> AsyncIterator[SupabaseImageStore]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url=URL) as http:
        client = await acreate_client(URL, KEY, options=AsyncClientOptions(httpx_client=http))
        yield SupabaseImageStore(client=client, supabase_url=URL, retry=RetryPolicy.immediate(attempts=3))


async def test_missing_buckets_are_created_public_and_existing_ones_kept(fake: FakeStorage,
                                                                         remote: SupabaseImageStore) -> None:
    fake.add_bucket("existing", public=False)
    await remote.ensure_buckets({"plant-images", "existing"})
    created = fake.get_bucket("plant-images")
    assert created is not None and created.public
    existing = fake.get_bucket("existing")
    assert existing is not None and not existing.public, "an operator's bucket settings are not touched"
    await remote.ensure_buckets({"plant-images"})
    assert fake.call_count("POST", "/bucket") == 1


async def test_upload_sets_content_type_upserts_as_a_string_and_returns_the_public_url(
    fake: FakeStorage, remote: SupabaseImageStore
) -> None:
    await remote.ensure_buckets({"plant-images"})
    url = await remote.upload("plant-images", "products/processed/p_v1.png", b"\x89PNG first", content_type="image/png")
    assert url == f"{URL}/storage/v1/object/public/plant-images/products/processed/p_v1.png"
    stored = fake.get_object("plant-images", "products/processed/p_v1.png")
    assert stored is not None and stored.content_type == "image/png" and stored.data == b"\x89PNG first"
    assert stored.cache_control == "max-age=3600"
    [upload] = fake.calls("POST", "/object/plant-images/")
    assert upload.headers["x-upsert"] == "true"

    # Overwriting the same path keeps the same public URL (callers add ?v= for re-runs).
    again = await remote.upload("plant-images", "products/processed/p_v1.png", b"\x89PNG second",
                                content_type="image/png")
    assert again == url
    stored = fake.get_object("plant-images", "products/processed/p_v1.png")
    assert stored is not None and stored.data == b"\x89PNG second"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app)) as browser:
        public = await browser.get(url)
    assert public.status_code == 200 and public.content == b"\x89PNG second"
    assert public.headers["content-type"] == "image/png"


async def test_download_round_trips_and_a_missing_object_is_not_found(remote: SupabaseImageStore) -> None:
    await remote.ensure_buckets({"b"})
    await remote.upload("b", "products/x.jpg", b"jpeg bytes", content_type="image/jpeg")
    assert await remote.download("b", "products/x.jpg") == b"jpeg bytes"
    with pytest.raises(StorageError) as missing:
        await remote.download("b", "products/nothing.jpg")
    assert missing.value.not_found and not missing.value.retryable


async def test_400_bodies_with_string_status_codes_become_our_errors(fake: FakeStorage,
                                                                     remote: SupabaseImageStore) -> None:
    with pytest.raises(StorageError, match="404") as no_bucket:
        await remote.upload("no-such-bucket", "a.png", b"x", content_type="image/png")
    assert not no_bucket.value.retryable
    await remote.ensure_buckets({"b"})
    with pytest.raises(StorageError, match="413") as too_big:
        await remote.upload("b", "big.png", b"x" * (2 * 1024 * 1024), content_type="image/png")
    assert not too_big.value.retryable
    assert fake.call_count("POST", "/object/b/big.png") == 1, "a permanent error is not retried"


async def test_transient_faults_are_retried(fake: FakeStorage, remote: SupabaseImageStore) -> None:
    await remote.ensure_buckets({"b"})
    fake.fail_next("POST", "/object/b/", status=503)
    fake.disconnect_next("POST", "/object/b/")
    await remote.upload("b", "a.png", b"x", content_type="image/png")
    assert fake.call_count("POST", "/object/b/a.png") == 3
    assert fake.get_object("b", "a.png") is not None

    fake.fail_next("GET", "/object/b/", status=500, times=3)
    with pytest.raises(StorageError) as exhausted:
        await remote.download("b", "a.png")
    assert exhausted.value.retryable


async def test_a_lost_upload_answer_is_safe_to_retry(fake: FakeStorage, remote: SupabaseImageStore) -> None:
    """The upload landed but the answer was lost: the retry overwrites (upsert) instead of failing 409."""
    await remote.ensure_buckets({"b"})
    fake.disconnect_next("POST", "/object/b/", after_handling=True)
    await remote.upload("b", "a.png", b"x", content_type="image/png")
    assert fake.call_count("POST", "/object/b/a.png") == 2


async def test_delete(fake: FakeStorage, remote: SupabaseImageStore) -> None:
    await remote.ensure_buckets({"b"})
    await remote.upload("b", "products/a.jpg", b"x", content_type="image/jpeg")
    await remote.delete("b", ["products/a.jpg", "products/unknown.jpg"])
    assert fake.get_object("b", "products/a.jpg") is None


@pytest.mark.parametrize("path", ["../escape.png", "/abs.png", "a/../../b.png", "", "a//b.png"])
async def test_unsafe_paths_are_refused_by_both_stores(remote: SupabaseImageStore, tmp_path: Path, path: str) -> None:
    local = LocalImageStore(root=tmp_path, public_base_url="http://x")
    with pytest.raises(ValueError):
        await remote.upload("b", path, b"x", content_type="image/png")
    with pytest.raises(ValueError):
        await local.upload("b", path, b"x", content_type="image/png")


async def test_local_store_writes_atomically_and_serves_urls(tmp_path: Path) -> None:
    store = LocalImageStore(root=tmp_path / "storage", public_base_url="http://localhost:8000/")
    await store.ensure_buckets({"plant-images"})
    url = await store.upload("plant-images", "products/p.jpg", b"one", content_type="image/jpeg")
    assert url == "http://localhost:8000/storage/plant-images/products/p.jpg"
    await store.upload("plant-images", "products/p.jpg", b"two", content_type="image/jpeg")
    assert await store.download("plant-images", "products/p.jpg") == b"two"
    leftovers = [p.name for p in (tmp_path / "storage" / "plant-images" / "products").iterdir()]
    assert leftovers == ["p.jpg"], "no temporary files left behind"
    with pytest.raises(StorageError) as missing:
        await store.download("plant-images", "products/none.jpg")
    assert missing.value.not_found
    await store.delete("plant-images", ["products/p.jpg"])
    assert not (tmp_path / "storage" / "plant-images" / "products" / "p.jpg").exists()
