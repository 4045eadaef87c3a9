"""The local studio's scenes and marketplace image: the piece's own pixels survive, each scene looks like itself, the
shadows and light fall where the scene says, and the white image stays white through JPEG."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from scipy import ndimage

import studio as scenes
from studio import SCENE_KEYS, Placement, encode_marketplace_jpeg, place_piece, render_marketplace, render_scene
from tests.conftest import framed

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
FRAME_PX = 384  # the properties below don't depend on size; 2048 is timed in bench/contact_sheet.py
ByteImage = npt.NDArray[np.uint8]


def sample_cutout(name: str) -> ByteImage:
    """An RGBA cut-out from a sample photo and its exact matte."""
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLES / f"{name}_photo.jpg")), cv2.COLOR_BGR2RGB)
    alpha = cv2.imread(str(SAMPLES / f"{name}_alpha.png"), cv2.IMREAD_GRAYSCALE)
    assert rgb is not None and alpha is not None, f"sample {name} missing from {SAMPLES}"
    return np.ascontiguousarray(np.dstack([rgb, alpha]))


@pytest.fixture(scope="module")
def ring() -> ByteImage:
    return sample_cutout("02_silver_engraved_band_white_sweep")


@pytest.fixture(scope="module", params=["02_silver_engraved_band_velvet", "04_pearl_stud_earrings_linen"])
def piece(request: pytest.FixtureRequest) -> ByteImage:
    return sample_cutout(request.param)


@pytest.fixture(scope="module")
def rendered(ring: ByteImage) -> dict[str, ByteImage]:
    return {scene: render_scene(ring, scene, FRAME_PX) for scene in SCENE_KEYS}


def frame_mask(placement: Placement, frame_px: int, *, opaque: bool = False) -> npt.NDArray[np.bool_]:
    alpha = framed(placement, frame_px)[1]
    return np.asarray(alpha == 255 if opaque else alpha > 0)


def luminance(image: ByteImage) -> npt.NDArray[np.float32]:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def margins(image: ByteImage) -> ByteImage:
    """The frame's four corners, well away from the centred piece: N×3 pixels of backdrop."""
    side = image.shape[0] // 6
    return np.concatenate([c.reshape(-1, 3) for c in (image[:side, :side], image[:side, -side:],
                                                       image[-side:, :side], image[-side:, -side:])])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# place_piece


def test_place_piece_crops_scales_and_centres(piece: ByteImage) -> None:
    placement = place_piece(piece, 1000, 0.7)
    height, width = placement.piece.shape[:2]
    assert placement.piece.dtype == np.uint8 and placement.piece.shape[2] == 4
    assert max(height, width) == 700
    assert (placement.x, placement.y) == ((1000 - width) // 2, (1000 - height) // 2)
    # cropped to the alpha's box: piece within a pixel of every border (shrinking may fade a faint edge row to 0)
    alpha = placement.piece[..., 3]
    assert alpha[:2].any() and alpha[-2:].any() and alpha[:, :2].any() and alpha[:, -2:].any()
    assert (placement.piece[..., :3][alpha == 0] == 0).all()


@pytest.mark.parametrize("frame_px", [200, 2400])  # shrinking and enlarging
def test_place_piece_keeps_the_opaque_core_opaque(ring: ByteImage, frame_px: int) -> None:
    placement = place_piece(ring, frame_px, 0.8)
    core_share = (ring[..., 3] == 255).sum() / (ring[..., 3] > 0).sum()
    placed = placement.piece[..., 3]
    assert (placed == 255).sum() / (placed > 0).sum() == pytest.approx(core_share, abs=0.1)


def test_place_piece_refuses_nonsense(ring: ByteImage) -> None:
    with pytest.raises(ValueError, match="empty"):
        place_piece(np.zeros((10, 10, 4), np.uint8), 100, 0.5)
    with pytest.raises(ValueError, match="H×W×4"):
        place_piece(ring[..., :3], 100, 0.5)
    with pytest.raises(ValueError, match="fill"):
        place_piece(ring, 100, 1.5)


# ---------------------------------------------------------------------------------------------------------------------
# Scenes


def test_every_scene_is_a_square_rgb_image(rendered: dict[str, ByteImage]) -> None:
    for image in rendered.values():
        assert image.shape == (FRAME_PX, FRAME_PX, 3) and image.dtype == np.uint8


def test_the_piece_is_composited_unchanged(piece: ByteImage) -> None:
    placement = place_piece(piece, FRAME_PX, scenes.SCENE_FILL)
    opaque = frame_mask(placement, FRAME_PX, opaque=True)
    assert opaque.sum() > 1000
    expected = framed(placement, FRAME_PX)[0]
    for scene in SCENE_KEYS:
        image = render_scene(piece, scene, FRAME_PX)
        assert np.array_equal(image[opaque], expected[opaque]), scene


def test_partial_alpha_blends_between_piece_and_scene(ring: ByteImage, rendered: dict[str, ByteImage]) -> None:
    placement = place_piece(ring, FRAME_PX, scenes.SCENE_FILL)
    height, width = placement.piece.shape[:2]
    box = np.s_[placement.y : placement.y + height, placement.x : placement.x + width]
    alpha = placement.piece[..., 3]
    edge = (alpha > 0) & (alpha < 255)
    # on the dark stone, the bright silver's edge pixels land between the two, nearer the piece as alpha rises
    out = luminance(rendered["stone"])[box][edge]
    source = luminance(np.ascontiguousarray(placement.piece[..., :3]))[edge]
    weight = alpha[edge] / 255
    assert np.mean(out <= source + 2) > 0.95
    assert np.corrcoef(weight, out)[0, 1] > 0.5


@pytest.mark.parametrize("scene", SCENE_KEYS)
def test_backdrops_are_textured_not_flat(rendered: dict[str, ByteImage], scene: str) -> None:
    # a band-pass (features of a few pixels to a few dozen) in each corner: a flat fill with 1.5 levels of noise
    # scores about 0.12, a gradient about 0
    lum = luminance(rendered[scene])
    band = cv2.GaussianBlur(lum, (0, 0), 3) - cv2.GaussianBlur(lum, (0, 0), 24)
    side = FRAME_PX // 6
    deviations = [float(c.std()) for c in (band[:side, :side], band[:side, -side:], band[-side:, :side],
                                           band[-side:, -side:])]  # fmt: skip
    assert min(deviations) > 0.5 and np.mean(deviations) > 2, deviations


def test_scenes_look_like_their_names(rendered: dict[str, ByteImage]) -> None:
    def stats(scene: str) -> tuple[npt.NDArray[np.float64], float, float, float]:
        pixels = margins(rendered[scene])
        hsv = cv2.cvtColor(pixels[None], cv2.COLOR_RGB2HSV)[0].astype(np.float64)
        return pixels.mean(axis=0), float(np.median(hsv[:, 0])) * 2, hsv[:, 1].mean() / 255, hsv[:, 2].mean() / 255

    (r, g, b), hue, saturation, value = stats("stone")
    assert 200 <= hue <= 240 and b > r + 20 and value < 0.4  # dark navy
    (r, g, b), _, saturation, value = stats("velvet")
    assert r > 1.8 * g and r > 1.5 * b and value < 0.5  # deep red
    (r, g, b), _, saturation, value = stats("marble")
    assert value > 0.8 and saturation < 0.08  # bright, nearly white
    (r, g, b), _, saturation, value = stats("charcoal")
    assert value < 0.25 and max(r, g, b) - min(r, g, b) < 6  # dark and neutral


def test_stone_is_lit_from_the_upper_left(rendered: dict[str, ByteImage]) -> None:
    lum = luminance(rendered["stone"])
    quarter = FRAME_PX // 4
    assert lum[:quarter, :quarter].mean() > 1.5 * lum[-quarter:, -quarter:].mean()


def darkening(ring: ByteImage, scene: str) -> tuple[npt.NDArray[np.float32], Placement]:
    """How much darker each pixel around the piece is than the same scene without it."""
    placement = place_piece(ring, FRAME_PX, scenes.SCENE_FILL)
    without = luminance(np.ascontiguousarray(scenes._backdrop(scene, FRAME_PX)))
    drop = without - luminance(render_scene(ring, scene, FRAME_PX))
    drop[frame_mask(placement, FRAME_PX)] = 0
    return drop, placement


@pytest.mark.parametrize("scene", ["velvet", "marble", "charcoal"])
def test_the_shadow_darkens_the_ground_just_below_the_piece(ring: ByteImage, scene: str) -> None:
    drop, placement = darkening(ring, scene)
    height, width = placement.piece.shape[:2]
    base = placement.y + height
    below = drop[base : base + FRAME_PX // 50, placement.x + width // 4 : placement.x + 3 * width // 4]
    above = drop[placement.y - FRAME_PX // 50 : placement.y, placement.x + width // 4 : placement.x + 3 * width // 4]
    assert below.mean() > 5
    assert below.mean() > 3 * max(above.mean(), 0.5)  # grounded, not an outline all round


def test_shadows_fall_away_from_each_scenes_light(ring: ByteImage) -> None:
    def centroid(scene: str) -> tuple[float, float]:
        drop, _ = darkening(ring, scene)
        weight = np.maximum(drop, 0)
        rows, cols = np.indices(weight.shape)
        return float((cols * weight).sum() / weight.sum()), float((rows * weight).sum() / weight.sum())

    placement = place_piece(ring, FRAME_PX, scenes.SCENE_FILL)
    centre_y = placement.y + placement.piece.shape[0] / 2
    (stone_x, stone_y), (velvet_x, velvet_y) = centroid("stone"), centroid("velvet")
    assert stone_y > centre_y and velvet_y > centre_y  # every key light is above
    assert velvet_x < stone_x - 5  # velvet's light is upper right, stone's upper left


def test_stone_reflects_the_piece_below_itself(ring: ByteImage, rendered: dict[str, ByteImage]) -> None:
    placement = place_piece(ring, FRAME_PX, scenes.SCENE_FILL)
    height, width = placement.piece.shape[:2]
    base = placement.y + height
    without = luminance(np.ascontiguousarray(scenes._backdrop("stone", FRAME_PX)))
    gain = luminance(rendered["stone"]) - without
    columns = np.s_[placement.x + width // 4 : placement.x + 3 * width // 4]
    near, far = gain[base : base + height // 20, columns], gain[-FRAME_PX // 40 :, columns]  # the frame's foot
    assert near.mean() > 4  # the bright silver shows in the polished stone ...
    assert abs(far.mean()) < near.mean() / 3  # ... fading with distance


def test_rim_glow_warms_the_backdrop_above_the_charcoal_piece(ring: ByteImage) -> None:
    placement = place_piece(ring, FRAME_PX, scenes.SCENE_FILL)
    width = placement.piece.shape[1]
    image = render_scene(ring, "charcoal", FRAME_PX).astype(np.float32)
    without = np.ascontiguousarray(scenes._backdrop("charcoal", FRAME_PX)).astype(np.float32)
    strip = np.s_[placement.y - FRAME_PX // 40 : placement.y, placement.x + width // 3 : placement.x + 2 * width // 3]
    gain = (image - without)[strip].reshape(-1, 3).mean(axis=0)
    assert gain[0] > 8 and gain[0] > 2 * gain[2]  # amber: red rises, blue much less


def test_unknown_scene_is_refused(ring: ByteImage) -> None:
    with pytest.raises(ValueError, match="unknown scene"):
        render_scene(ring, "beach", FRAME_PX)


def test_rendering_is_deterministic_and_thread_safe(ring: ByteImage, rendered: dict[str, ByteImage]) -> None:
    scenes._backdrop.cache_clear()  # so the backdrops are painted again, here, concurrently
    with ThreadPoolExecutor(max_workers=4) as pool:
        again = list(pool.map(lambda scene: render_scene(ring, scene, FRAME_PX), SCENE_KEYS * 2))
    for index, image in enumerate(again):
        assert np.array_equal(image, rendered[SCENE_KEYS[index % 4]])


def test_the_backdrop_cache_cannot_be_written_through() -> None:
    with pytest.raises(ValueError, match="read-only"):
        scenes._backdrop("marble", 64)[0, 0] = 0


# ---------------------------------------------------------------------------------------------------------------------
# Marketplace


def decode(jpeg: bytes) -> ByteImage:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.fixture(scope="module")
def marketplace(ring: ByteImage) -> tuple[ByteImage, Placement]:
    return render_marketplace(ring), place_piece(ring, 2000, 0.85)


def test_marketplace_is_white_around_a_centred_piece(marketplace: tuple[ByteImage, Placement]) -> None:
    image, placement = marketplace
    assert image.shape == (2000, 2000, 3) and image.dtype == np.uint8
    mask = frame_mask(placement, 2000)
    assert (image[~mask] == 255).all()
    rows, cols = np.nonzero((image != 255).any(axis=2))
    longer = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert longer == pytest.approx(0.85 * 2000, abs=4)
    assert (rows.min() + rows.max()) / 2 == pytest.approx(1000, abs=3)
    assert (cols.min() + cols.max()) / 2 == pytest.approx(1000, abs=3)
    opaque = frame_mask(placement, 2000, opaque=True)
    piece_rgb = framed(placement, 2000)[0]
    assert np.array_equal(image[opaque], piece_rgb[opaque])


def test_marketplace_stays_white_through_jpeg(piece: ByteImage) -> None:
    image = render_marketplace(piece)
    placement = place_piece(piece, 2000, 0.85)
    decoded = decode(encode_marketplace_jpeg(image))
    far = ndimage.distance_transform_edt(~frame_mask(placement, 2000)) > 16
    assert (decoded[far] == 255).all()


def test_marketplace_jpeg_is_a_small_high_quality_file(marketplace: tuple[ByteImage, Placement]) -> None:
    image, _ = marketplace
    jpeg = encode_marketplace_jpeg(image)
    assert jpeg[:2] == b"\xff\xd8" and len(jpeg) < 1_500_000
    assert np.abs(decode(jpeg).astype(int) - image).mean() < 1.0


def test_where_the_piece_sat_in_the_photo_does_not_matter(ring: ByteImage) -> None:
    moved = np.zeros((1200, 1500, 4), np.uint8)  # the same piece elsewhere on a larger canvas
    moved[300 : 300 + ring.shape[0], 500 : 500 + ring.shape[1]] = ring
    assert np.array_equal(render_marketplace(ring, 600), render_marketplace(moved, 600))
    assert np.array_equal(render_scene(ring, "velvet", FRAME_PX), render_scene(moved, "velvet", FRAME_PX))
