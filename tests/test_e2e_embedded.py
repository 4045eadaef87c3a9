"""End to end through real HTTP on embedded defaults: the service as a real process with nothing configured
(SQLite, the storage folder, the local studio), a sample photo uploaded, the row polled until done, and every
image downloaded from the URLs in the row."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from studio import MARKETPLACE_FILL, SCENE_FILL, SCENE_FRAME_PX, place_piece
from tests.conftest import framed, sample_photos
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

    # The scenes: 2048 px squares, and the piece in each is the cut-out's own pixels, never repainted.
    placement = place_piece(np.asarray(cutout), SCENE_FRAME_PX, SCENE_FILL)
    assert max(placement.piece.shape[:2]) == round(SCENE_FILL * SCENE_FRAME_PX)
    assert (placement.piece[..., 3] == 255).mean() > 0.05, "the placed piece has a solid body"
    piece_rgb, piece_alpha = framed(placement, SCENE_FRAME_PX)
    opaque = piece_alpha == 255
    scenes = []
    for url in row["generated_image_urls"]:
        variant = fetch_image(url)
        assert variant.format == "PNG" and variant.size == (SCENE_FRAME_PX, SCENE_FRAME_PX)
        pixels = np.asarray(variant.convert("RGB"))
        assert np.array_equal(pixels[opaque], piece_rgb[opaque]), url
        scenes.append(pixels)
    # ...on four different rendered backdrops, none of them flat.
    corners = [scene[:256, :256].reshape(-1, 3) for scene in scenes]
    assert all(corner.std(axis=0).max() > 1.0 for corner in corners), "procedural texture, not a flat colour"
    assert len({tuple(np.round(corner.mean(axis=0) / 8)) for corner in corners}) == 4

    # The marketplace image: a 2000 px JPEG, pure white wherever the piece is not, the piece at about 85 %.
    marketplace = fetch_image(row["marketplace_image_url"])
    assert marketplace.format == "JPEG" and marketplace.size == (2000, 2000)
    white = np.asarray(marketplace.convert("RGB"))
    piece = (framed(place_piece(np.asarray(cutout), 2000, MARKETPLACE_FILL), 2000)[1] > 0).astype(np.uint8)
    # JPEG blocks are 8 px: every pixel more than one block (diagonal) away from the piece is exactly #FFFFFF.
    far = cv2.distanceTransform(1 - piece, cv2.DIST_L2, 5) > 8 * np.sqrt(2)
    assert (white[far] == 255).all(), "the marketplace background is pure white"
    rows, cols = np.nonzero((white < 250).any(axis=2))
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    assert 0.83 * 2000 <= extent <= 0.87 * 2000, extent
