"""The HTTP API in process (httpx ASGITransport) on the embedded stores with scripted providers."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import pytest
from PIL import Image

from database import JobStatus
from main import create_app
from tests.conftest import jpeg_bytes, ring_photo
from worker import Worker


@pytest.fixture
async def api(make_services: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    services = await make_services(max_upload_bytes=200_000)
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client, services


def stored_files(services: Any) -> list[str]:
    root = services.settings.data_dir / "storage"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def upload(client: httpx.AsyncClient, data: bytes, content_type: str = "image/jpeg", **form: str):
    return await client.post("/process", files={"file": ("photo.jpg", data, content_type)}, data=form)


async def test_upload_is_accepted_stored_and_queued(api: Any) -> None:
    client, services = api
    response = await upload(client, ring_photo(), title="Gold ring", jewellery_type="ring")
    assert response.status_code == 202
    body = response.json()
    assert body["message"] and body["raw_image_url"]
    product_id = body["product_id"]
    assert response.headers["location"] == f"/product/{product_id}"
    assert response.headers["x-request-id"]
    assert stored_files(services) == [f"plant-images/products/{product_id}.jpg"]

    row = (await client.get(f"/product/{product_id}")).json()
    assert row["status"] == "pending" and row["title"] == "Gold ring" and row["jewellery_type"] == "ring"
    assert row["generated_image_urls"] == [] and row["image_url"] == body["raw_image_url"]
    assert [v["label"] for v in row["variants"]] == ["Stone — Classic", "Velvet — Boutique", "Marble — Editorial",
                                                     "Charcoal — Dramatic"]

    raw = await client.get(body["raw_image_url"].replace("http://testserver", ""))
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/jpeg"


async def test_a_whole_job_through_the_api(api: Any) -> None:
    client, services = api
    product_id = (await upload(client, ring_photo())).json()["product_id"]
    await Worker(services=services, retry_backoff_s=0).run_once()
    row = (await client.get(f"/product/{product_id}")).json()
    assert row["status"] == "done" and len(row["generated_image_urls"]) == 4
    for url in row["generated_image_urls"]:
        image = await client.get(url.replace("http://testserver", ""))
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"


async def test_defaults_for_title(api: Any) -> None:
    client, _ = api
    product_id = (await upload(client, jpeg_bytes())).json()["product_id"]
    assert (await client.get(f"/product/{product_id}")).json()["title"] == "Untitled"


async def test_format_is_decided_by_content_not_by_declared_type(api: Any) -> None:
    client, services = api
    png = io.BytesIO()
    Image.new("RGB", (60, 40), (1, 2, 3)).save(png, "PNG")
    assert (await upload(client, png.getvalue(), content_type="application/octet-stream")).status_code == 202

    refused = await upload(client, b"hello, I am text pretending to be a JPEG", content_type="image/jpeg")
    assert refused.status_code == 415
    assert "JPEG, PNG, WebP or HEIC/HEIF" in refused.json()["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (10, 10)).save(gif, "GIF")
    assert (await upload(client, gif.getvalue(), content_type="image/gif")).status_code == 415
    assert len(stored_files(services)) == 1


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"", 422), (jpeg_bytes(300, 300)[:400], 422)],
    ids=["empty", "truncated"],
)
async def test_unreadable_images_are_422_and_store_nothing(api: Any, data: bytes, status: int) -> None:
    client, services = api
    response = await upload(client, data)
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert stored_files(services) == []
    assert (await client.get("/products")).json()["items"] == []


async def test_too_many_pixels_is_422(make_services: Any) -> None:
    services = await make_services(max_image_pixels=10_000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services=services)),
                                 base_url="http://testserver") as client:
        response = await upload(client, jpeg_bytes(200, 200))
    assert response.status_code == 422 and "pixels" in response.json()["detail"]
    assert stored_files(services) == []


async def test_oversized_upload_with_content_length_is_413(api: Any) -> None:
    client, services = api
    response = await upload(client, b"\xff" * 600_000)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert stored_files(services) == []


async def test_oversized_upload_without_content_length_is_413(api: Any) -> None:
    client, services = api
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(100):  # 6.4 MB if nobody stops us
            sent += 64 * 1024
            yield b"\xff" * (64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await client.post("/process", content=body(),
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert stored_files(services) == []


async def test_a_file_just_over_the_limit_is_413_even_inside_the_multipart_allowance(api: Any) -> None:
    client, services = api
    response = await upload(client, b"\xff" * 200_001)
    assert response.status_code == 413
    assert stored_files(services) == []


async def test_over_long_title_is_422_and_stores_nothing(api: Any) -> None:
    client, services = api
    response = await upload(client, jpeg_bytes(), title="x" * 201)
    assert response.status_code == 422 and "title" in response.json()["detail"]
    assert stored_files(services) == []


async def test_malformed_requests(api: Any) -> None:
    client, _ = api
    assert (await client.post("/process", data={"title": "no file"})).status_code == 422
    broken = await client.post("/process", content=b"--x\r\nnot multipart at all",
                               headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert 400 <= broken.status_code < 500


async def test_product_lookup_errors(api: Any) -> None:
    client, _ = api
    assert (await client.get("/product/not-a-uuid")).status_code == 422
    missing = await client.get(f"/product/{uuid4()}")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]


async def test_retrigger(api: Any) -> None:
    client, services = api
    product_id = (await upload(client, ring_photo())).json()["product_id"]
    assert (await client.post(f"/process/{uuid4()}")).status_code == 404
    job = await services.store.claim_next_job(worker_id="w", lease_s=60)
    assert job is not None
    busy = await client.post(f"/process/{product_id}", files={"file": ("p.jpg", jpeg_bytes(), "image/jpeg")})
    assert busy.status_code == 409
    await services.store.release_job(job.id, worker_id="w", error="x", retry_in_s=0, max_attempts=1)

    again = await client.post(f"/process/{product_id}")
    assert again.status_code == 202 and again.json()["product_id"] == product_id
    row = (await client.get(f"/product/{product_id}")).json()
    assert row["status"] == JobStatus.PENDING

    with_photo = await client.post(f"/process/{product_id}", files={"file": ("p.jpg", jpeg_bytes(), "image/jpeg")})
    assert with_photo.status_code == 202
    assert with_photo.json()["raw_image_url"] != again.json()["raw_image_url"]


async def test_list_products_paginates_newest_first(api: Any) -> None:
    client, _ = api
    ids = [(await upload(client, jpeg_bytes(), title=f"p{i}")).json()["product_id"] for i in range(3)]
    page = (await client.get("/products", params={"limit": 2})).json()
    assert [p["id"] for p in page["items"]] == ids[::-1][:2]
    assert page["limit"] == 2 and page["offset"] == 0
    rest = (await client.get("/products", params={"limit": 2, "offset": 2})).json()
    assert [p["id"] for p in rest["items"]] == [ids[0]]
    assert (await client.get("/products", params={"limit": 0})).status_code == 422
    assert (await client.get("/products", params={"limit": 1000})).status_code == 422


async def test_health_reports_backends(api: Any) -> None:
    client, _ = api
    body = (await client.get("/health")).json()
    assert body["status"] == "ok" and body["environment"] == "test"
    assert (body["database"], body["storage"], body["background_remover"], body["variant_generator"]) == (
        "sqlite", "local", "local", "local")


async def test_local_storage_route_refuses_escapes(api: Any) -> None:
    client, _ = api
    assert (await client.get("/storage/plant-images/../../products.db")).status_code == 404
    assert (await client.get("/storage/plant-images/products/nothing.jpg")).status_code == 404


async def test_openapi_documents_every_route_with_models(api: Any) -> None:
    client, _ = api
    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) >= {"/process", "/product/{product_id}", "/process/{product_id}", "/products", "/health"}
    for path, methods in paths.items():
        for method, operation in methods.items():
            ok = next(code for code in operation["responses"] if code.startswith("2"))
            assert "schema" in operation["responses"][ok]["content"]["application/json"], (method, path)
    assert (await client.get("/docs")).status_code == 200


async def test_the_upload_page_is_served(api: Any) -> None:
    client, _ = api
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'fetch("process"' in page.text and "product/${id}" in page.text
