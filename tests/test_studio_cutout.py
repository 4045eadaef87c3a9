"""The local cut-out (`studio.cut_out`) on the sample photos with exact mattes, and on small synthetic scenes built
here for the properties the samples can't isolate (fringe colour, an empty backdrop, determinism)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from studio import Cutout, cut_out

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
SAMPLE_NAMES = sorted(p.name.removesuffix("_photo.jpg") for p in SAMPLES.glob("*_photo.jpg"))

pytestmark = pytest.mark.skipif(not SAMPLE_NAMES, reason=f"no sample photos in {SAMPLES}")


def load_sample(name: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    bgr = cv2.imread(str(SAMPLES / f"{name}_photo.jpg"), cv2.IMREAD_COLOR)
    alpha = cv2.imread(str(SAMPLES / f"{name}_alpha.png"), cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), alpha.astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def cut_samples() -> dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], Cutout]]:
    """Each sample cut once for the whole module (a cut-out takes about a second)."""
    results = {}
    for name in SAMPLE_NAMES:
        rgb, truth = load_sample(name)
        results[name] = (rgb, truth, cut_out(rgb))
    return results


def alpha_of(cutout: Cutout) -> npt.NDArray[np.float32]:
    return cutout.rgba[..., 3].astype(np.float32) / 255.0


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_matches_its_ground_truth(cut_samples: dict, name: str) -> None:
    _, truth, cutout = cut_samples[name]
    alpha = alpha_of(cutout)
    mask, expected = alpha > 0.5, truth > 0.5
    iou = np.count_nonzero(mask & expected) / np.count_nonzero(mask | expected)
    mae = float(np.abs(alpha - truth).mean())
    assert iou >= 0.85, f"IoU {iou:.3f}"
    assert mae <= 0.05, f"mean absolute alpha error {mae:.4f}"


def test_output_is_rgba_of_the_input_size(cut_samples: dict) -> None:
    rgb, _, cutout = cut_samples[SAMPLE_NAMES[0]]
    assert cutout.rgba.shape == (*rgb.shape[:2], 4)
    assert cutout.rgba.dtype == np.uint8
    assert 0.0 <= cutout.confidence <= 1.0


def test_edges_are_soft(cut_samples: dict) -> None:
    for name, (_, truth, cutout) in cut_samples.items():
        alpha = cutout.rgba[..., 3]
        edge = cv2.morphologyEx((truth > 0.5).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        partial = (alpha > 12) & (alpha < 243)
        assert np.count_nonzero(partial & edge) > 0.25 * np.count_nonzero(edge), name


def test_background_inside_a_ring_is_removed(cut_samples: dict) -> None:
    rings = [n for n in SAMPLE_NAMES if "band" in n or "bangle" in n]
    assert rings
    for name in rings:
        _, truth, cutout = cut_samples[name]
        background = (truth < 0.5).astype(np.uint8)
        labels = cv2.connectedComponents(background, connectivity=4)[1]
        enclosed = (labels != labels[0, 0]) & (background > 0)
        depth = cv2.distanceTransform(enclosed.astype(np.uint8), cv2.DIST_L2, 5)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        assert depth[y, x] > 10, f"{name}: no hole in the ground truth"
        assert cutout.rgba[y, x, 3] < 26, f"{name}: alpha {cutout.rgba[y, x, 3]} in the hole at ({x}, {y})"


def gold_disc_on_green(size: int = 320) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], np.ndarray]:
    """A shaded gold disc, anti-aliased by supersampling, on a saturated green card with a little noise."""
    scale = 4
    big = np.zeros((size * scale, size * scale), np.uint8)
    cv2.circle(big, (size * scale // 2, size * scale // 2), size * scale // 5, 255, -1, cv2.LINE_AA)
    alpha = cv2.resize(big.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    piece_colour = np.array([225.0, 175.0, 80.0], np.float32)
    shade = (0.8 + 0.3 * (1 - yy))[..., None]
    piece = np.clip(piece_colour * shade, 0, 255)
    backdrop = np.array([40.0, 170.0, 70.0], np.float32) * (0.95 + 0.1 * xx)[..., None]
    rng = np.random.default_rng(7)
    photo = alpha[..., None] * piece + (1 - alpha[..., None]) * backdrop + rng.normal(0, 1.0, (size, size, 3))
    return np.clip(photo, 0, 255).round().astype(np.uint8), alpha, piece


def test_no_colour_fringe_from_the_backdrop() -> None:
    rgb, truth, piece = gold_disc_on_green()
    cutout = cut_out(rgb)
    alpha = alpha_of(cutout)
    edge = (truth > 0.1) & (truth < 0.9) & (alpha > 0.1)
    assert np.count_nonzero(edge) > 50
    colour = cutout.rgba[..., :3].astype(np.float32)[edge]
    to_piece = np.linalg.norm(colour - piece[edge], axis=-1)
    to_backdrop = np.linalg.norm(colour - np.array([40.0, 170.0, 70.0]), axis=-1)
    assert np.mean(to_piece < to_backdrop) > 0.9
    assert float(np.median(colour[:, 1] - colour[:, 0])) < 0, "edge colours lean green"


def test_blank_backdrop_gives_low_confidence() -> None:
    size = 384
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 0.9 + 0.08 * (1 - yy) - 0.05 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    rng = np.random.default_rng(3)
    photo = np.array([235.0, 232.0, 226.0]) * light[..., None] + rng.normal(0, 1.5, (size, size, 3))
    cutout = cut_out(np.clip(photo, 0, 255).round().astype(np.uint8))
    assert cutout.confidence < 0.2
    assert np.count_nonzero(cutout.rgba[..., 3] > 128) < 0.001 * size * size


def test_same_input_gives_the_same_output_in_any_thread() -> None:
    rgb, _, _ = gold_disc_on_green(256)
    first = cut_out(rgb)
    results: list[Cutout] = []
    threads = [threading.Thread(target=lambda: results.append(cut_out(rgb))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2
    for again in results:
        assert np.array_equal(again.rgba, first.rgba)
        assert again.confidence == first.confidence


def test_small_and_odd_inputs_are_handled() -> None:
    tiny = np.full((40, 64, 3), 200, np.uint8)
    tiny[15:25, 25:40] = (30, 30, 30)
    cutout = cut_out(tiny)
    assert cutout.rgba.shape == (40, 64, 4)
    with pytest.raises(ValueError):
        cut_out(np.zeros((10, 10), np.uint8))
