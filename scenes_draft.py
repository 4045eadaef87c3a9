"""The local studio's scenes: the cut-out piece photographed, procedurally, on four surfaces, and on plain white.

Each scene is a ground plane seen through a short telephoto from the scene's camera elevation, textured with lattice
noise evaluated in the plane's own coordinates (so the texture recedes in perspective and softens with depth of
field) and lit from the scene's key light. Around the piece come what a photographer gets for free: a contact shadow
and a cast shadow made from the piece's own silhouette, a mirrored reflection on polished surfaces, the glow of a
rim light behind it on charcoal. The piece itself is never repainted: it goes "over" the scene with its own pixels,
so what a shopper sees is the real piece.

Backdrops depend only on (scene, frame size) and are cached read-only. Everything else is a pure function of its
inputs: deterministic (fixed seeds), no shared mutable state, safe to run in several threads at once.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

ByteImage = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]

SCENE_KEYS = ("stone", "velvet", "marble", "charcoal")
SCENE_FILL = 0.64  # the piece's longer side as a share of the frame, the same in every scene
ENLARGE_INTERPOLATION = cv2.INTER_CUBIC  # place_piece when enlarging (INTER_AREA when shrinking)
WORK_PX = 1024  # backdrops are painted at most this size, then enlarged; the fine grain is added at full size
MARKETPLACE_JPEG_QUALITY = 95
# 4:4:4: an 8×8 block with no piece pixel in it stays exactly white, so nothing changes more than 7·√2 ≈ 10 px from
# the piece. 4:2:0 spreads chroma ringing over 16×16 blocks and the decoder's upsampling, measured up to 19 px.
MARKETPLACE_JPEG_SUBSAMPLING = 0


@dataclass(frozen=True)
class Placement:
    """The cut-out as it sits in a square frame: `piece` is h×w×4 uint8 (straight alpha), its top-left at (x, y)."""

    piece: ByteImage
    x: int
    y: int


def place_piece(cutout: ByteImage, frame_px: int, fill: float) -> Placement:
    """Crop the cut-out (H×W×4 uint8 straight alpha) to its alpha bbox, scale so its longer side is `fill`×frame_px,
    centre it.

    Resampling works on premultiplied colour, so the colour of transparent pixels never bleeds into the edge:
    INTER_AREA when shrinking, `ENLARGE_INTERPOLATION` (bicubic, clipped to the valid range) when enlarging.
    """
    if cutout.ndim != 3 or cutout.shape[2] != 4 or cutout.dtype != np.uint8:
        raise ValueError(f"expected an H×W×4 uint8 cut-out, got {cutout.shape} {cutout.dtype}")
    if frame_px < 8:
        raise ValueError(f"frame_px must be at least 8, got {frame_px}")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    opaque_rows = np.flatnonzero(cutout[..., 3].any(axis=1))
    opaque_cols = np.flatnonzero(cutout[..., 3].any(axis=0))
    if opaque_rows.size == 0:
        raise ValueError("the cut-out is empty: no pixel has alpha above 0")
    crop = cutout[opaque_rows[0] : opaque_rows[-1] + 1, opaque_cols[0] : opaque_cols[-1] + 1]
    crop_h, crop_w = crop.shape[:2]
    scale = fill * frame_px / max(crop_h, crop_w)
    width = min(frame_px, max(1, round(crop_w * scale)))
    height = min(frame_px, max(1, round(crop_h * scale)))
    piece = crop if (width, height) == (crop_w, crop_h) else _resize_straight_alpha(crop, width, height)
    return Placement(piece=np.ascontiguousarray(piece), x=(frame_px - width) // 2, y=(frame_px - height) // 2)


def render_scene(cutout: ByteImage, scene: str, frame_px: int = 2048) -> ByteImage:
    """H×W×3 uint8 square image of the piece on the named scene.

    The piece is placed with `place_piece(cutout, frame_px, SCENE_FILL)`. Where its alpha is 255 the output is its
    RGB exactly; partial alpha is an "over" blend with the scene.
    """
    if scene not in SCENE_KEYS:
        raise ValueError(f"unknown scene {scene!r}; expected one of {SCENE_KEYS}")
    placement = place_piece(cutout, frame_px, SCENE_FILL)
    look = _LOOKS[scene]
    canvas = _f32(_backdrop(scene, frame_px)) * np.float32(1 / 255)
    if look.rim_colour is not None:
        _add_rim_glow(canvas, placement, look.rim_colour)
    _add_shadows(canvas, placement, look)
    if look.reflection > 0:
        _add_reflection(canvas, placement, look.reflection)
    return _composite(canvas, placement)


def render_marketplace(cutout: ByteImage, frame_px: int = 2000, fill: float = 0.85) -> ByteImage:
    """Pure white square image (every pixel outside the piece exactly 255,255,255)."""
    placement = place_piece(cutout, frame_px, fill)
    return _composite(np.ones((frame_px, frame_px, 3), np.float32), placement)


def encode_marketplace_jpeg(image: ByteImage) -> bytes:
    """JPEG bytes of a marketplace image: quality 95, 4:4:4, under which every pixel more than 10 px from the piece
    decodes as exactly 255,255,255."""
    out = io.BytesIO()
    Image.fromarray(image).save(
        out, "JPEG", quality=MARKETPLACE_JPEG_QUALITY, subsampling=MARKETPLACE_JPEG_SUBSAMPLING, optimize=True
    )
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Placing and compositing


def _f32(array: object) -> FloatImage:
    """A numpy or OpenCV result as a float32 array (no copy when it already is one)."""
    return np.asarray(array, dtype=np.float32)


def _resize_straight_alpha(rgba: ByteImage, width: int, height: int) -> ByteImage:
    shrinking = width * height < rgba.shape[0] * rgba.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else ENLARGE_INTERPOLATION
    alpha = _f32(rgba[..., 3])
    premultiplied = _f32(rgba[..., :3]) * (alpha * np.float32(1 / 255))[..., None]
    alpha = np.clip(_f32(cv2.resize(alpha, (width, height), interpolation=interpolation)), 0, 255)
    premultiplied = _f32(cv2.resize(premultiplied, (width, height), interpolation=interpolation))
    premultiplied = premultiplied.reshape(height, width, 3)
    out_alpha = np.rint(alpha).astype(np.uint8)
    colour = premultiplied * np.float32(255) / np.maximum(alpha, np.float32(1e-3))[..., None]
    colour = np.where(out_alpha[..., None] > 0, np.clip(np.rint(colour), 0, 255), 0)
    return np.dstack([colour.astype(np.uint8), out_alpha])


def _composite(canvas: FloatImage, placement: Placement) -> ByteImage:
    """The piece "over" the canvas (0..1 floats, consumed), quantised; fully opaque pixels are copied, not blended."""
    piece = placement.piece
    box = np.s_[placement.y : placement.y + piece.shape[0], placement.x : placement.x + piece.shape[1]]
    alpha = _f32(piece[..., 3:4]) * np.float32(1 / 255)
    region = canvas[box]
    region *= 1 - alpha
    region += _f32(piece[..., :3]) * (alpha * np.float32(1 / 255))
    out = _to_bytes(canvas)
    opaque = piece[..., 3] == 255
    out[box][opaque] = piece[..., :3][opaque]
    return out


def _to_bytes(image: FloatImage) -> ByteImage:
    """0..1 floats (never negative) to uint8, rounded and saturated, in one pass."""
    return np.asarray(cv2.convertScaleAbs(image, alpha=255.0), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# The piece in the scene: shadows, reflection, rim glow


@dataclass(frozen=True)
class _Look:
    """How a scene treats the piece. `light_from` points towards the key light in the image (x right, y down)."""

    light_from: tuple[float, float]
    contact: float  # darkness of the occlusion along the piece's lower edge, 0..1
    cast: float  # darkness of the shadow laid on the ground in front of the piece, 0..1
    cast_length: float  # that shadow's length, as a share of the height above ground of what casts it
    cast_drop: float  # how far it starts below the base, as a share of the piece's longer side: more as light lowers
    cast_blur: float  # its blur sigma, same unit
    reflection: float  # opacity of the mirrored piece where it meets the surface; 0 on matte surfaces
    rim_colour: tuple[float, float, float] | None = None  # a glow behind the piece, as from a rim light


_LOOKS: dict[str, _Look] = {
    "stone": _Look((-0.71, -0.71), 0.6, 0.5, cast_length=0.25, cast_drop=0.02, cast_blur=0.035, reflection=0.22),
    "velvet": _Look((0.71, -0.71), 0.65, 0.5, cast_length=0.25, cast_drop=0.02, cast_blur=0.045, reflection=0.0),
    "marble": _Look((-0.2, -0.98), 0.6, 0.4, cast_length=0.2, cast_drop=0.015, cast_blur=0.05, reflection=0.2),
    "charcoal": _Look(
        (0.0, -1.0), 0.6, 0.65, cast_length=0.08, cast_drop=0.004, cast_blur=0.012, reflection=0.0,
        rim_colour=(1.0, 0.55, 0.16),
    ),
}  # fmt: skip

_EFFECT_FACTOR = 4  # shadows and glows are smooth: they are worked out at a quarter of the frame size


def _frame_alpha(placement: Placement, frame_px: int) -> FloatImage:
    """The placed piece's alpha (0..1) over the whole frame, reduced `_EFFECT_FACTOR` times."""
    alpha = np.zeros((frame_px, frame_px), np.uint8)
    height, width = placement.piece.shape[:2]
    alpha[placement.y : placement.y + height, placement.x : placement.x + width] = placement.piece[..., 3]
    small = max(1, frame_px // _EFFECT_FACTOR)
    return _f32(cv2.resize(alpha, (small, small), interpolation=cv2.INTER_AREA)) * np.float32(1 / 255)


def _blur(image: FloatImage, sigma: float) -> FloatImage:
    """Gaussian blur; a wide one runs on a reduced copy (its result is smooth, so nothing is lost)."""
    factor = 2 ** max(0, math.floor(math.log2(max(sigma, 1.0) / 4)))
    if factor == 1:
        return _f32(cv2.GaussianBlur(image, (0, 0), max(sigma, 0.3)))
    height, width = image.shape[:2]
    small_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return _f32(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))


def _shift(image: FloatImage, dx: float, dy: float) -> FloatImage:
    matrix = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    return _f32(cv2.warpAffine(image, matrix, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR))


def _upsample_box(effect: FloatImage, frame_px: int) -> tuple[tuple[slice, slice], FloatImage]:
    """A reduced effect map (0 = no effect) at full size, cropped to where it does anything (above 1/512, half a
    level of an 8-bit pixel)."""
    rows = np.flatnonzero(effect.max(axis=1) > 1 / 512)
    cols = np.flatnonzero(effect.max(axis=0) > 1 / 512)
    if rows.size == 0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)
    scale = frame_px / effect.shape[0]
    box = (
        slice(max(0, math.floor((rows[0] - 1) * scale)), min(frame_px, math.ceil((rows[-1] + 2) * scale))),
        slice(max(0, math.floor((cols[0] - 1) * scale)), min(frame_px, math.ceil((cols[-1] + 2) * scale))),
    )
    full = _f32(cv2.resize(effect, (frame_px, frame_px), interpolation=cv2.INTER_LINEAR))
    return box, full[box]


def _ground_line(alpha: FloatImage, reach_px: float) -> FloatImage:
    """Per column, the row where the piece meets the ground: its lowest row there, or the lowest within `reach_px`
    columns either side (a part floating beside a lower one rests on the same ground), smoothed. Columns without
    piece take their neighbours' value."""
    present = alpha > 0.5
    columns = np.flatnonzero(present.any(axis=0))
    if columns.size == 0:
        return np.full(alpha.shape[1], alpha.shape[0] - 1, np.float32)
    lowest = alpha.shape[0] - 1 - np.argmax(present[::-1, columns], axis=0)
    line = np.interp(np.arange(alpha.shape[1]), columns, lowest)
    line = ndimage.maximum_filter1d(line, 2 * round(reach_px) + 1, mode="nearest")
    return _f32(ndimage.gaussian_filter1d(line, max(0.5, reach_px / 2), mode="nearest"))


def _add_shadows(canvas: FloatImage, placement: Placement, look: _Look) -> None:
    """Darken the surface where the piece meets it and where it blocks the key light.

    Both shadows come from the piece's own silhouette and its ground line (`_ground_line`), so each part of a piece
    (two earrings) is grounded where it stands. The contact occlusion is the silhouette's lower rim (piece pixels
    with no piece just below them, near the ground line), blurred wider than tall. The cast shadow is the silhouette
    with its holes filled, laid down on the ground: squashed towards the ground line to `cast_length`, leaning and
    dropping away from the light, blurred; so it pools under the piece and reaches out on the far side.
    """
    frame_px = canvas.shape[0]
    alpha = _frame_alpha(placement, frame_px)
    height, width = (side / _EFFECT_FACTOR for side in placement.piece.shape[:2])
    size = max(height, width)
    ground = _ground_line(alpha, 0.06 * width)[None, :]
    rows, cols = (_f32(grid) for grid in np.indices(alpha.shape))

    gap = max(1, round(0.02 * size))
    below = np.zeros_like(alpha)
    below[:-gap] = alpha[gap:]
    rim = np.clip(alpha - below, 0, 1) * _smoothstep(-0.5 * height, -0.1 * height, rows - ground)
    rim = _blur(_shift(rim, -0.3 * gap * look.light_from[0], 0.5 * gap), 0.6 * gap)
    contact = np.minimum(_f32(cv2.GaussianBlur(rim, (0, 0), sigmaX=1.5 * gap, sigmaY=0.5 * gap)) * 2.5, 1)

    # where on the silhouette each ground pixel's shadow comes from: the inverse of "squash towards the ground line,
    # drop, lean away from the light by the height above ground"
    source_rows = ground + (rows - look.cast_drop * size - ground) / look.cast_length
    source_cols = cols + 0.6 * look.cast_length * look.light_from[0] * (ground - source_rows)
    cast = _f32(cv2.remap(_fill_holes(alpha), source_cols, source_rows, cv2.INTER_LINEAR))
    cast = np.minimum(_blur(cast, look.cast_blur * size) * 1.3, 1)

    box, shade = _upsample_box(1 - (1 - look.contact * contact) * (1 - look.cast * cast), frame_px)
    canvas[box] *= (1 - shade)[..., None]


def _fill_holes(alpha: FloatImage) -> FloatImage:
    """The silhouette with what it encloses (a ring's hole) filled in."""
    outside = (alpha < 0.5).astype(np.uint8)
    flood_mask = np.zeros((alpha.shape[0] + 2, alpha.shape[1] + 2), np.uint8)
    # the frame's corner is outside the piece: place_piece leaves a margin unless fill is 1, and then this fills less
    cv2.floodFill(outside, flood_mask, (0, 0), 2)
    return np.maximum(alpha, _f32(outside == 1))


def _add_rim_glow(canvas: FloatImage, placement: Placement, colour: tuple[float, float, float]) -> None:
    """A warm halo on the backdrop around the piece, strongest above it, as from a rim light behind it; screen-blended
    under the piece, whose own pixels it never touches."""
    frame_px = canvas.shape[0]
    alpha = _frame_alpha(placement, frame_px)
    size = max(placement.piece.shape[:2]) / _EFFECT_FACTOR
    near = _blur(_shift(alpha, 0, -0.02 * size), 0.045 * size)
    wide = _blur(_shift(alpha, 0, -0.05 * size), 0.16 * size)
    rows = np.arange(alpha.shape[0], dtype=np.float32)[:, None]
    top, height = placement.y / _EFFECT_FACTOR, placement.piece.shape[0] / _EFFECT_FACTOR
    from_behind = np.clip(1 - 0.6 * (rows - top) / height, 0.35, 1)
    glow = (0.5 * np.minimum(near * 1.5, 1) + 0.5 * np.minimum(wide * 1.4, 1)) * from_behind
    box, strength = _upsample_box(glow, frame_px)
    light = strength[..., None] * (np.array(colour, np.float32) * np.float32(0.55))
    region = canvas[box]
    region += (1 - region) * light  # screen blend: brightens, never past white


def _add_reflection(canvas: FloatImage, placement: Placement, strength: float) -> None:
    """The piece mirrored about its ground line (`_ground_line`), fading and blurring with distance, as on a polished
    surface. Worked out at half size: it is blurred anyway."""
    frame_px = canvas.shape[0]
    piece = placement.piece
    height, width = piece.shape[:2]
    extent = min(frame_px - placement.y, round(1.4 * height))  # the piece and room below it for the reflection
    small_w, small_h = max(1, width // 2), max(1, extent // 2)
    reach = 0.2 * height  # 40 % of the piece's height, in half-size pixels
    if extent - height < 8:
        return
    rgba = np.zeros((extent, width, 4), np.float32)
    rgba[:height, :, 3] = _f32(piece[..., 3]) * np.float32(1 / 255)
    rgba[:height, :, :3] = _f32(piece[..., :3]) * (rgba[:height, :, 3:4] * np.float32(1 / 255))
    small = _f32(cv2.resize(rgba, (small_w, small_h), interpolation=cv2.INTER_AREA)).reshape(small_h, small_w, 4)
    ground = _ground_line(small[..., 3], 0.06 * small_w)[None, :]
    rows, cols = (_f32(grid) for grid in np.indices((small_h, small_w)))
    mirrored = _f32(cv2.remap(small, cols, 2 * ground - rows, cv2.INTER_LINEAR))
    distance = np.clip((rows - ground) / np.float32(reach), 0, 1)[..., None]
    sigma = max(1.0, 0.003 * height)
    blurred = _blur(mirrored, sigma) * (1 - distance) + _blur(mirrored, sigma * 5) * distance
    faded = blurred * (np.float32(strength) * (1 - distance) ** 2 * (rows > ground)[..., None])
    full = _f32(cv2.resize(faded, (width, extent), interpolation=cv2.INTER_LINEAR)).reshape(extent, width, 4)
    region = canvas[placement.y : placement.y + extent, placement.x : placement.x + width]
    region *= 1 - full[..., 3:4]
    region += full[..., :3]


# ---------------------------------------------------------------------------------------------------------------------
# Procedural toolkit: a ground plane in perspective, noise on it, shading


@dataclass(frozen=True)
class _Camera:
    """A camera looking down at a ground plane. Plane coordinates (u, v) are in frame widths at the frame's centre,
    v growing towards the camera (down the image); depth is the distance relative to the centre's."""

    elevation_deg: float
    focal: float = 1.6  # in frame widths: a short telephoto, as jewellery is shot

    def ground_at(self, sx: FloatImage, sy: FloatImage) -> tuple[FloatImage, FloatImage, FloatImage]:
        """Plane coordinates of screen points (sx, sy in -0.5..0.5 from the centre, sy down)."""
        sin_e, cos_e = math.sin(math.radians(self.elevation_deg)), math.cos(math.radians(self.elevation_deg))
        depth = (self.focal * sin_e) / (self.focal * sin_e + sy * cos_e)
        u = depth * sx
        v = self.focal * cos_e - depth * (self.focal * cos_e - sy * sin_e)
        return _f32(u), _f32(v), _f32(depth)

    def ground(self, res: int) -> tuple[FloatImage, FloatImage, FloatImage]:
        steps = _f32((np.arange(res) + 0.5) / res - 0.5)
        sx, sy = np.meshgrid(steps, steps)
        return self.ground_at(sx, sy)


def _lattice_noise(
    rng: np.random.Generator, camera: _Camera, res: int, cells: float, angle: float, stretch: float
) -> FloatImage:
    """One octave of smooth value noise on the ground plane, `cells` lattice cells per unit (times `stretch` along
    the rotated v axis), sampled at res×res."""
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def lattice(u: FloatImage, v: FloatImage) -> tuple[FloatImage, FloatImage]:
        return _f32((u * cos_a - v * sin_a) * cells), _f32((u * sin_a + v * cos_a) * cells * stretch)

    # The lattice's extent comes from the screen's corners alone (the visible plane is a trapezoid, so they bound
    # it): the same seed paints the same texture at any frame size.
    corner_u, corner_v = lattice(*camera.ground_at(_f32([-0.5, 0.5, -0.5, 0.5]), _f32([-0.5, -0.5, 0.5, 0.5]))[:2])
    origin_u, origin_v = math.floor(float(corner_u.min())) - 2, math.floor(float(corner_v.min())) - 2
    grid_w = math.ceil(float(corner_u.max())) - origin_u + 3
    grid_h = math.ceil(float(corner_v.max())) - origin_v + 3
    grid = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
    # Two traps: cv2.remap resolves positions to 1/32 of a source pixel (terraces in the shading, on a bare lattice),
    # and bicubic enlargement by a large factor ripples the slope within every source pixel (a grid in the shading).
    # pyrUp's 2× steps are cubic B-spline subdivision, smooth in value and slope: the lattice is refined with it to
    # `texels` pixels a cell, sampled in perspective where a cell spans about texels/2 screen pixels, and the samples
    # refined with it again to the full size.
    levels = int(np.clip(math.log2(2048 / max(grid_h, grid_w)), 3, 6))
    texture = grid
    for _ in range(levels):
        texture = _f32(cv2.pyrUp(texture))
    texels = 2**levels
    cell_px = 1.5 * res / (cells * max(1.0, stretch))  # the largest a cell appears, near the camera
    halvings = max(0, math.floor(math.log2(max(1.0, cell_px / (texels / 2)))))
    step = 2**halvings
    # after `halvings` pyrUps, sample i lands on output pixel i·step: sample the screen there
    positions = _f32((np.arange(math.ceil(res / step) + 1) * step + 0.5) / res - 0.5)
    sx, sy = np.meshgrid(positions, positions)
    map_u, map_v = lattice(*camera.ground_at(sx, sy)[:2])
    # pyrUp keeps lattice point i at pixel i·2^levels
    map_u = (map_u - np.float32(origin_u)) * np.float32(texels)
    map_v = (map_v - np.float32(origin_v)) * np.float32(texels)
    layer = _f32(cv2.remap(texture, map_u, map_v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT))
    for _ in range(halvings):
        layer = _f32(cv2.pyrUp(layer))
    return np.ascontiguousarray(layer[:res, :res])


def _fbm(
    rng: np.random.Generator,
    camera: _Camera,
    res: int,
    cells: float,
    octaves: int,
    *,
    gain: float = 0.5,
    stretch: float = 1.0,
    angle: float | None = None,
    turbulence: bool = False,
) -> FloatImage:
    """Fractal noise normalised to zero mean and unit deviation; with `turbulence`, the sum of the octaves' absolute
    values, normalised to unit mean. Each octave is turned by its own angle, unless `angle` fixes one for all (a
    grain)."""
    total = np.zeros((res, res), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        turn = float(rng.uniform(0, math.pi)) if angle is None else angle
        layer = _lattice_noise(rng, camera, res, cells * 2.0**octave, turn, stretch)
        total += np.float32(amplitude) * (np.abs(layer) if turbulence else layer)
        amplitude *= gain
    if turbulence:
        return total / np.float32(max(float(total.mean()), 1e-6))
    return _f32((total - total.mean()) / np.float32(max(float(total.std()), 1e-6)))


def _screen(res: int) -> tuple[FloatImage, FloatImage]:
    """Screen coordinates 0..1 (x right, y down) of a res×res image."""
    steps = _f32((np.arange(res) + 0.5) / res)
    x, y = np.meshgrid(steps, steps)
    return x, y


def _slopes(height: FloatImage, bump: float) -> tuple[FloatImage, FloatImage]:
    """The height field's slopes per frame width, times `bump` (one-sided at the border, so no seam there)."""
    gy, gx = np.gradient(height)
    scale = np.float32(height.shape[0] * bump)
    return _f32(gx) * scale, _f32(gy) * scale


def _facing(gx: FloatImage, gy: FloatImage, direction: tuple[float, float, float]) -> FloatImage:
    """The cosine between the surface normal and `direction` (x right, y down, z out of the picture), clipped at 0."""
    dx, dy, dz = (float(c) for c in np.array(direction) / np.linalg.norm(direction))
    return _f32(np.clip((dz - gx * dx - gy * dy) / np.sqrt(gx * gx + gy * gy + 1), 0, 1))


def _lambert(height: FloatImage, light: tuple[float, float, float], bump: float) -> FloatImage:
    """Diffuse shading of a height field (in units of its own deviation) lit from `light`."""
    return _facing(*_slopes(height, bump), light)


def _specular(height: FloatImage, light: tuple[float, float, float], bump: float, shininess: float) -> FloatImage:
    """Blinn-Phong highlight of a height field seen from straight out of the picture."""
    halfway = np.array(light) / np.linalg.norm(light) + np.array([0.0, 0.0, 1.0])
    hx, hy, hz = (float(c) for c in halfway)
    return np.power(_facing(*_slopes(height, bump), (hx, hy, hz)), np.float32(shininess))


def _smoothstep(edge0: float, edge1: float, x: FloatImage) -> FloatImage:
    t = np.clip((x - np.float32(edge0)) / np.float32(edge1 - edge0), 0, 1)
    return _f32(t * t * (3 - 2 * t))


def _colour(rgb: tuple[int, int, int]) -> FloatImage:
    return np.array(rgb, np.float32) * np.float32(1 / 255)


def _mix(a: FloatImage, b: FloatImage, weight: FloatImage) -> FloatImage:
    """a where weight is 0, b where it is 1 (colours or images; weight is H×W)."""
    return a + (b - a) * weight[..., None]


def _depth_of_field(image: FloatImage, blur: FloatImage, sigma: float) -> FloatImage:
    """Blur that grows with `blur` (0 sharp .. 1 at `sigma`, as a share of the image size): two blurred levels
    blended, which reads as a continuous defocus. Only the rows with some blur are touched (the far part of the
    plane, at the top)."""
    res = image.shape[0]
    blurred_rows = np.flatnonzero(blur.max(axis=1) > 0)
    if blurred_rows.size == 0:
        return image
    last = int(blurred_rows[-1]) + 1
    top = image[: min(res, last + math.ceil(3 * sigma * res))]
    half = _blur(top, sigma * res * 0.4)[:last]
    full = _blur(top, sigma * res)[:last]
    low = np.clip(blur[:last] * 2, 0, 1)[..., None]
    high = np.clip(blur[:last] * 2 - 1, 0, 1)[..., None]
    out = image.copy()
    out[:last] = image[:last] * (1 - low) + half * (low - high) + full * high
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The four backdrops


@dataclass(frozen=True)
class _Painting:
    rgb: FloatImage  # work×work×3, 0..1
    grain: FloatImage  # work×work: the deviation of the fine grain added at full size (0..1 units)
    grain_tint: tuple[float, float, float]


def _paint_stone(res: int) -> _Painting:
    """Dark navy sculpted stone, seen nearly front-on, soft light from the upper left."""
    rng = np.random.default_rng(1101)
    camera = _Camera(elevation_deg=58)
    x, y = _screen(res)
    depth = camera.ground(res)[2]
    swell = _fbm(rng, camera, res, 1.1, 3, gain=0.45)
    # carved facets: inverted turbulence has creases between rounded hollows, as chiselled stone does; softened, as
    # by wear, so no knife edges
    facets = _fbm(rng, camera, res, 5.0, 3, gain=0.5, turbulence=True)
    facets = _blur((np.float32(facets.mean()) - facets) / np.float32(max(float(facets.std()), 1e-6)), res / 500)
    grit = _fbm(rng, camera, res, 24.0, 2, gain=0.5)
    height = swell + 0.32 * facets + 0.12 * grit
    light = (-0.55, -0.6, 0.58)
    diffuse = _lambert(height, light, 0.025)
    gloss = _specular(height, light, 0.025, 30.0)
    tone = _fbm(rng, camera, res, 3.0, 4, gain=0.6) + 0.45 * _fbm(rng, camera, res, 90.0, 2, gain=0.6)
    albedo = _mix(_colour((22, 33, 66)), _colour((38, 54, 98)), _smoothstep(-1.8, 1.8, tone))
    # the key light's pool: brightest towards the upper left, falling off across the frame
    pool = 0.5 + 0.85 * np.exp(-((x + 0.05) ** 2 + (y + 0.1) ** 2) / (2 * 0.62**2))
    lit = _f32((0.42 + 0.85 * diffuse) * pool)
    rgb = albedo * lit[..., None] + _f32(gloss * pool * 0.1)[..., None] * _colour((150, 170, 215))
    rgb = _depth_of_field(rgb, _smoothstep(1.02, 1.45, depth), 0.005)
    return _Painting(rgb=rgb, grain=np.full((res, res), 0.009, np.float32), grain_tint=(0.8, 0.95, 1.3))


def _bokeh(res: int, rng: np.random.Generator, count: int, lowest: float) -> FloatImage:
    """Soft warm discs, as out-of-focus lights far behind; brighter towards the upper right (the light's side)."""
    layer = np.zeros((res, res, 3), np.float32)
    palette = [_colour((255, 196, 120)), _colour((255, 170, 92)), _colour((255, 222, 165)), _colour((240, 150, 90))]
    for _ in range(count):
        cx, cy = float(rng.uniform(-0.05, 1.05)), float(rng.uniform(-0.05, lowest))
        radius = float(rng.uniform(0.015, 0.05))
        strength = float(rng.uniform(0.1, 0.4)) * (0.4 + 0.6 * cx)
        colour = palette[int(rng.integers(len(palette)))]
        # drawn in its own patch: a flat disc with a slightly brighter rim, as a lens renders a point out of focus
        reach = math.ceil(radius * res) + 3
        patch = np.zeros((2 * reach + 1, 2 * reach + 1), np.float32)
        left, top = math.floor(cx * res) - reach, math.floor(cy * res) - reach
        centre = (round((cx * res - left) * 16), round((cy * res - top) * 16))  # 4 bits of subpixel position
        cv2.circle(patch, centre, round(radius * res * 16), 0.8, -1, cv2.LINE_AA, 4)
        cv2.circle(patch, centre, round(radius * res * 15), 1.0, max(1, round(res / 500)), cv2.LINE_AA, 4)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + patch.shape[1], res), min(top + patch.shape[0], res)
        if x0 < x1 and y0 < y1:
            visible = patch[y0 - top : y1 - top, x0 - left : x1 - left]
            layer[y0:y1, x0:x1] += (visible * np.float32(strength))[..., None] * colour
    return _blur(layer, max(0.8, res / 600))


def _paint_velvet(res: int) -> _Painting:
    """A burgundy velvet cushion seen from the front left at 45°, warm golden light from the upper right, the room
    behind it out of focus with soft bokeh."""
    rng = np.random.default_rng(2202)
    camera = _Camera(elevation_deg=42)
    x, y = _screen(res)
    depth = camera.ground(res)[2]
    puff = _fbm(rng, camera, res, 0.9, 2, gain=0.4)
    crush = _fbm(rng, camera, res, 1.5, 4, gain=0.5, stretch=3.0, angle=0.6)
    pile = _fbm(rng, camera, res, 6.0, 2, gain=0.5, stretch=2.0, angle=0.6)
    slope_x, slope_y = _slopes(puff + 0.25 * crush, 0.06)
    diffuse = _facing(slope_x, slope_y, (0.6, -0.55, 0.58))
    # velvet shines where its pile is bent over (the crushed streaks) and where it is seen edge-on: on slopes, and
    # far away towards the back of the cushion
    edge_on = np.clip(np.sqrt(slope_x * slope_x + slope_y * slope_y) * 1.5, 0, 1)
    sheen = 1.2 * (0.5 * _smoothstep(0.0, 2.0, crush + 0.3 * pile) + 0.5 * edge_on) * (0.4 + 0.6 * diffuse)
    sheen += 0.3 * _smoothstep(0.95, 1.4, depth)
    # the cushion's back edge rounds away: a rim of sheen where the pile turns edge-on
    edge = 0.17 + 0.05 * (2 * x - 1) ** 2 - 0.02 * (2 * x - 1)
    below = y - edge
    sheen += 0.4 * np.exp(-np.maximum(below, 0) / 0.02) * 1.6
    warm = 0.66 + 0.66 * np.exp(-((x - 1.0) ** 2 + (y + 0.05) ** 2) / (2 * 0.6**2))
    pile_colour = _mix(_colour((32, 3, 13)), _colour((86, 11, 34)), diffuse)
    rgb = (pile_colour + sheen[..., None] * _colour((96, 34, 48))) * (_f32(warm)[..., None] * _colour((255, 232, 200)))
    rgb = _depth_of_field(rgb, _smoothstep(0.95, 1.35, depth), 0.008)
    room = _mix(_colour((20, 8, 8)), _colour((64, 32, 20)), _smoothstep(0.2, 1.2, x + 0.4 * (0.3 - y)))
    cushion = _smoothstep(-0.006, 0.006, below)
    rgb = _mix(room + _bokeh(res, rng, 30, 0.3), rgb, cushion)
    grain = 0.004 + 0.008 * cushion * _smoothstep(0.0, 0.25, below)
    return _Painting(rgb=rgb, grain=grain, grain_tint=(1.3, 0.55, 0.6))


def _paint_marble(res: int) -> _Painting:
    """White Carrara marble with grey veining, seen from about 30° off overhead, bright diffused daylight."""
    rng = np.random.default_rng(3303)
    camera = _Camera(elevation_deg=60)
    x, y = _screen(res)
    u, v, depth = camera.ground(res)
    # turbulence-warped sine veins: thin where the sine crosses zero, meandering with the warp, kinked by the
    # turbulence, fading in and out along their length; hairlines across them
    warp = _fbm(rng, camera, res, 0.8, 3, gain=0.5)
    turbulence = _fbm(rng, camera, res, 2.5, 5, gain=0.55, turbulence=True)
    along = u * math.cos(0.7) + v * math.sin(0.7)
    ridge = 1 - np.abs(np.sin(along * np.float32(4 * math.pi) + 1.6 * warp + 0.5 * turbulence))
    core = np.power(ridge, np.float32(10))
    halo = _blur(np.power(ridge, np.float32(3)), res / 250)
    presence = _smoothstep(-1.0, 1.0, _fbm(rng, camera, res, 1.2, 3, gain=0.5))
    across = u * math.cos(-0.35) + v * math.sin(-0.35)
    hair_turbulence = _fbm(rng, camera, res, 3.0, 4, gain=0.6, turbulence=True)
    hair_ridge = 1 - np.abs(np.sin(across * 14 + 2 * hair_turbulence + warp))
    hairlines = np.power(hair_ridge, np.float32(26)) * _smoothstep(-0.2, 1.4, _fbm(rng, camera, res, 1.5, 2))
    cloud = _smoothstep(-0.6, 2.2, _fbm(rng, camera, res, 1.5, 5, gain=0.55))
    veins = np.clip(presence * (0.55 * core + 0.45 * halo) + 0.3 * hairlines, 0, 1)
    stone = _mix(_mix(_colour((240, 240, 238)), _colour((208, 211, 216)), 0.7 * cloud), _colour((128, 132, 138)), veins)
    daylight = 0.96 + 0.09 * _smoothstep(1.15, -0.1, y + 0.25 * x)
    rgb = stone * (daylight[..., None] * _colour((250, 252, 255)))
    rgb = _depth_of_field(rgb, _smoothstep(1.05, 1.35, depth), 0.004)
    return _Painting(rgb=rgb, grain=np.full((res, res), 0.006, np.float32), grain_tint=(1.0, 1.0, 1.0))


def _paint_charcoal(res: int) -> _Painting:
    """Deep charcoal, a hard spotlight from above pooling around the piece, vignetted."""
    rng = np.random.default_rng(4404)
    camera = _Camera(elevation_deg=50)
    x, y = _screen(res)
    u, v, depth = camera.ground(res)
    mottle = _fbm(rng, camera, res, 2.5, 5, gain=0.55)
    # the spot is round on the ground, so an ellipse in the picture; a hard light, so a narrow edge
    radius = np.sqrt(u * u + (v - 0.06) ** 2)
    pool = _smoothstep(0.52, 0.45, radius) * (0.7 + 0.3 * _smoothstep(0.5, 0.0, radius))
    spill = np.exp(-(radius * radius) / (2 * 0.55**2))
    gradient = 0.08 - 0.035 * y
    vignette = 1 - 0.55 * _smoothstep(0.35, 0.85, np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2))
    luminance = (gradient + 0.04 * spill + 0.2 * pool) * vignette * (1 + 0.12 * mottle)
    rgb = luminance[..., None] * _colour((255, 252, 248))
    rgb = _depth_of_field(rgb, _smoothstep(1.05, 1.4, depth), 0.004)
    return _Painting(rgb=rgb, grain=_f32(0.005 + 0.01 * pool), grain_tint=(1.0, 1.0, 1.0))


_PAINTERS: dict[str, Callable[[int], _Painting]] = {
    "stone": _paint_stone,
    "velvet": _paint_velvet,
    "marble": _paint_marble,
    "charcoal": _paint_charcoal,
}


@functools.lru_cache(maxsize=8)
def _backdrop(scene: str, frame_px: int) -> ByteImage:
    """The scene without the piece, frame_px² uint8; read-only, as it is shared between calls and threads."""
    work = min(frame_px, WORK_PX)
    painting = _PAINTERS[scene](work)
    rgb, grain_sd = painting.rgb, painting.grain
    if work != frame_px:
        rgb = _f32(cv2.resize(rgb, (frame_px, frame_px), interpolation=cv2.INTER_CUBIC))
        grain_sd = _f32(cv2.resize(grain_sd, (frame_px, frame_px), interpolation=cv2.INTER_LINEAR))
    rng = np.random.default_rng(9000 + SCENE_KEYS.index(scene))
    # the blur makes the grain a little coarser than a pixel and takes its deviation down to about 0.4 (hence 2.5);
    # it also dithers, so smooth gradients don't band when quantised
    grain = _f32(cv2.GaussianBlur(rng.standard_normal((frame_px, frame_px), dtype=np.float32), (0, 0), 0.7))
    grain *= grain_sd * np.float32(2.5)
    for channel, tint in enumerate(painting.grain_tint):
        rgb[..., channel] += grain * np.float32(tint)
    out = _to_bytes(np.maximum(rgb, 0, out=rgb))
    out.setflags(write=False)
    return out
