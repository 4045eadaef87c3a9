"""End to end through real HTTP on embedded defaults: the service as a real process with nothing configured
(SQLite, the storage folder, the local studio), a sample photo uploaded, the row polled until done, and every
image downloaded from the URLs in the row."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import sample_photos
from tests.service_process import ServiceProcess, stopped_cleanly


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("embedded")
    process = ServiceProcess({"DATA_DIR": str(tmp / "data"), "ENVIRONMENT": "development"},
                             log_path=tmp / "service.log").start()
    yield process
    assert stopped_cleanly(process.stop()), process.logs()[-3000:]


def poll_until_finished(client: httpx.Client, product_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = client.get(f"/product/{product_id}").json()
        if row["status"] in ("done", "failed"):
            return dict(row)
        time.sleep(0.25)
    raise TimeoutError(f"product {product_id} still {row['status']} after {timeout_s} s")


def fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, url
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_health_names_the_embedded_backends(service: ServiceProcess) -> None:
    body = httpx.get(f"{service.base_url}/health").json()
    assert body["status"] == "ok"
    assert (body["database"], body["storage"], body["background_remover"], body["variant_generator"]) == (
        "sqlite", "local", "local", "local")
    assert body["worker"] == "running"


def test_a_sample_photo_becomes_a_cutout_four_scenes_and_a_white_image(service: ServiceProcess) -> None:
    photo: Path = next(p for p in sample_photos() if "bangle_white_sweep" in p.name)
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        response = client.post("/process", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                               data={"title": "Gold rope bangle", "jewellery_type": "bangle"})
        assert response.status_code == 202, response.text
        product_id = response.json()["product_id"]
        row = poll_until_finished(client, product_id)

    assert row["status"] == "done", row["error"]
    assert [v["status"] for v in row["variants"]] == ["done"] * 4
    assert len(row["generated_image_urls"]) == 4
    assert row["image_url"] == row["generated_image_urls"][0]
    assert 0.0 <= row["cutout_confidence"] <= 1.0

    cutout = fetch_image(row["cutout_url"])
    assert cutout.mode == "RGBA"
    alpha = np.asarray(cutout.getchannel("A"))
    assert alpha.min() == 0 and alpha.max() == 255, "a cut-out has both background and piece"

    for url in row["generated_image_urls"]:
        variant = fetch_image(url)
        assert variant.format == "PNG" and variant.size[0] == variant.size[1] >= 1024

    marketplace = fetch_image(row["marketplace_image_url"])
    assert marketplace.format == "JPEG" and marketplace.size == (2000, 2000)
    corner = np.asarray(marketplace.convert("RGB"))[:100, :100]
    assert (corner == 255).all(), "the marketplace background is pure white"
