"""The local studio: what the service does on this machine when no AI provider is configured, and the white
marketplace image it makes for every product whichever providers ran. Three parts, each usable alone:

- `cut_out`: the piece separated from the shop's backdrop, with a soft matte and a confidence score;
- `render_scene` / `render_marketplace`: the piece on the four rendered scenes, and on pure white;
- `LocalBackgroundRemover` / `LocalVariantGenerator`: the two as providers behind the protocols of `ai_clients.py`.

Cut-out (`cut_out`) separates the piece from the shop's backdrop with no model weights. The backdrop is assumed to
cover the image border and to be smooth or stationary in texture (paper sweeps, card, wood, cloth).

1. Backdrop field. The backdrop's colour everywhere is a quadratic surface fitted to the pixels believed to be
   backdrop, refined by normalised convolution (push-pull), so light falloff and a spot's bright centre are absorbed.
   It is fitted to the lit backdrop only, so shadows are explained as shadows.
2. Evidence. A pixel is the piece if it departs from the field in chroma (after the best uniform darkening), in
   brightness above it (a highlight), or as a darkening too thin to be a shadow (a chain, a prong). Each departure is
   measured against the same departure on the backdrop itself (its 99.9th percentile), so wood grain or a weave
   raises its own bar. Darker with the backdrop's chroma is a shadow or grey metal: a weak vote only.
3. Segmentation. A graph cut (Boykov-Kolmogorov max-flow) at no more than SEGMENT_SIDE_PX combines that evidence
   with colour mixtures learnt from both sides and a contrast-sensitive smoothness term; three rounds re-fit the
   field and the mixtures.
   Components without a visible outline (a velvet fold, a swell of light) and specks are dropped; regions enclosed
   by the piece are kept as holes (a ring's inside, a chain loop) when wide and smooth like the backdrop, and filled
   when thin or busy (a clear stone's facets). A dim region with the backdrop's chroma is a shadow or grey metal
   alike, so the cut is made under two hypotheses (colour may say "piece" there, or only "backdrop") and the one
   whose result the image supports better (its confidence, below) is kept. When neither is sure (a band polished
   like a mirror, whose outline doesn't close), a third completes the better one's convex outline, keeping the
   hole seen through it (found by casting rays from its middle to the edges around it); if that one is kept, a
   band's faces that still mirror the backdrop are restored from its outline (two rims' ellipses fitted to it).
4. Matte and defringe. In a band around the labels' edge alpha solves I = aF + (1 - a)sB per pixel of the full image,
   with B the local backdrop colour, s its darkening where the piece shadows it (told from a mix by colour) and F the
   best of a few local piece colours; closed-form matting (in every 3×3 window alpha is an affine function of
   colour) then smooths that across pixels, pulled towards each pixel's own solution as far as it is reliable, and
   carries alpha across where F and B are too alike. Colours there are unmixed from sB, so no fringe of the old
   backdrop remains.
5. Confidence. From the segmentation: stable labels, evidence that agrees with them along the boundary, a plausible
   size and framing, few fragments, a piece thick enough for a pixel of rim error not to matter, and above all an
   outline that is an edge all round with no edges running on outside the cut (which is what a missed mirror-like
   part of the piece, or a shadow taken in, leaves behind). That last is taken again once contact shadows are
   peeled off, not counting edges in the backdrop's shadows (a peeled shadow's outline, cloth texture it brings out).

Scenes (`render_scene`). Each scene is a ground plane seen through a short telephoto from the scene's camera
elevation, textured with lattice noise evaluated in the plane's own coordinates (so the texture recedes in
perspective and softens with depth of field) and lit from the scene's key light. Around the piece come what a
photographer gets for free: a contact shadow and a cast shadow made from the piece's own silhouette, a mirrored
reflection on polished surfaces, the glow of a rim light behind it on charcoal. The piece itself is never repainted:
it goes "over" the scene with its own pixels (where its alpha is 255 the output is its RGB exactly), so what a
shopper sees is the real piece. Backdrops depend only on (scene, frame size) and are cached read-only.

Everything here is a pure function of its input: deterministic (fixed seeds), no shared mutable state, safe to run in
several threads at once.
"""

from __future__ import annotations

import asyncio
import functools
import io
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import maxflow
import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage, optimize
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import cg

import images
from ai_clients import CutoutResult, TaskSubmitted, VariantRequest
from errors import ProviderRejected

ByteImage = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]
BoolImage = npt.NDArray[np.bool_]

# Sizes
SEGMENT_SIDE_PX = 512  # the segmentation runs at no more than this (longer side)
MATTE_SIDE_PX = 1024  # backdrop and piece colours for the matte are estimated at no more than this
BORDER_SHARE = 0.03  # the band along the image border taken as backdrop to start from...
BORDER_SIDE_RATIO = 2.0  # ...but a side departing this many times more than the others has a piece in it
MIN_PIECE_PX = 10  # at the segmentation size; fewer and the photo is taken to show no piece

# Backdrop field and evidence (nats are natural-log likelihood ratios; > 0 favours the piece)
FIELD_FINEST = 1 / 32  # finest push-pull blur, as a share of the image side: coarser than texture, finer than folds
LIT_MARGIN = 3.0  # noise units below the field at which a backdrop pixel counts as shadowed
EVIDENCE_THRESHOLD = 3.0  # a departure at the backdrop's own BACKDROP_QUANTILE scores this many units
BACKDROP_QUANTILE = 0.999
CHROMA_NOISE_FLOOR = 0.4  # Lab units, added to the backdrop's chroma covariance
CHROMA_FLOOR = 1.0  # Lab units: the least chroma departure that counts, however clean the backdrop
LEVEL_NOISE_FLOOR = 0.01  # log brightness
LEVEL_FLOOR = 0.02  # log brightness: the least brightening that counts
THIN_FLOOR = 0.05  # log brightness: the least thin darkening that counts
SHADOW_MIN_SCALE = 0.55  # Lab scale (of L+16, a, b) of the darkest shadow explained: about 17 % of the light
SHADOW_MIN_WIDTH = 0.012  # darkening narrower than this share of the image side is not a shadow
SHADOW_SATURATION = 1.0  # how much more saturated than the lit backdrop its deepest shadow may be (1 = twice)
SHADOW_TINT = 3.0  # Lab units of extra chroma tolerance per unit of shadow depth (light bounced off the piece)
SHADOW_BIAS = -1.5  # nats for a shallow shadow-like darkening...
SHADOW_DEPTH_GAIN = 8.0  # ...rising with depth (nats per unit of Lab scale), capped at +-2: contrast decides
LIT_WEIGHT = 4.0  # nats against the piece for a pixel that matches the lit backdrop
UNARY_CAP = 12.0  # nats; keeps one odd pixel from outvoting its neighbourhood
SEED_EVIDENCE = 4.0  # nats of field evidence that make a pixel a sure sample of the piece
GMM_COMPONENTS = 5
COLOUR_CAP = 3.0  # nats the learnt colour mixtures can add for either side
PIECE_MODEL_EVIDENCE = -1.0  # the piece's colour mixture learns from its labels where the evidence is above this

# Segmentation
SMOOTHNESS = 30.0  # nats per pair of 4-neighbours of equal colour; contrast lowers it
CUT_ROUNDS = 3
CAPACITY_SCALE = 64  # max-flow works on integers
TIED = 1 << 30  # a capacity no cut pays: ties a pixel to the backdrop
GRAPH_MARGIN = 3.0  # nats: pixels this sure of being backdrop, and not next to any less sure, stay out of the graph
OUTLINE_QUANTILE = 0.99  # a steep edge is steeper than this share of the backdrop's gradients
OUTLINE_SHARE = 0.2  # a component of the piece needs this share of its rim on steep edges
OUTLINE_REACH = 0.04  # edges this far (share of the image side) from the piece may close its outline
HOLE_MIN_RADIUS = 0.025  # enclosed regions narrower than this share of the image side are part of the piece...
HOLE_MAX_BUSY = 0.1  # ...and so are those with more steep pixels than this share in their core...
HOLE_CORE = 0.3  # ...the pixels further from their rim than this share of the deepest's distance
COMPLETE_BELOW = 0.5  # a cut less sure than this is tried once more with its convex outline completed...
HOLE_OPEN_SHARE = 0.25  # ...where a wide region inside it is a hole seen through: rays from its middle end on edges
HOLE_RAYS = 360
HOLE_SPIKE_RAYS = 5  # rays: one longer than the median of this many around it went through a chink in the edge
HOLE_JUMP = 0.05  # share of the median ray: a step this large from one ray to the next ends one stretch of the edge...
HOLE_JUMP_PX = 3.0  # ...and at least this many pixels (the rays' ends are whole pixels)
HOLE_ELLIPSE_FIT = 1.5  # px: across such gaps the edge is the ellipse through the other rays' ends if they fit it
BAND_HOLE_SHARE = 0.05  # a band's hole is at least this share of its outline (a pin hole between two pearls is not)
BAND_TRIM_PX = 3.0  # the labels' outline further inside a band's than this is a lost face: refitted without it...
BAND_PRESENT = 0.4  # ...and at least this share of the outline must be there...
BAND_FIT_PX = 1.5  # ...and fit the band's outline (two rims' ellipses) this well...
BAND_FIT_SHARE = 0.6  # ...over this share of it...
BAND_INSIDE_WEIGHT = 0.5  # ...(the labels falling inside it, where a face mirrors the backdrop, count this much)...
BAND_FACE_DEPTH = 3.0  # ...and what it adds beyond them is this deep somewhere (px at the segmentation size)...
BAND_MAX_ADDED = 0.25  # ...and no more than this share of the labels
BAND_PINHOLE_SHARE = 0.01  # a band's other holes under this share of its labels are where a face mirrors the backdrop
BAND_START_SHIFT = 0.02  # the fit starts with the far rim this share of the outline's size from the near one
BAND_SCOUT_STEPS = 10  # each start gets this many solver steps, and the best of them is refined
BAND_BOUNDS = (  # the far rim is at most 5 % smaller or larger than the near one (a band is short beside its distance
    [-np.inf] * 7 + [0.95, 0.2],  # to the camera), and the inner edges are 20-99 % of the rims (the other parameters,
    [np.inf] * 7 + [1.05, 0.99],  # centre, semi-axes, angle and shift, are free)
)
BRIDGE_GAP = 0.012  # in that round, outline edges stopping this short of the labels (share of the side) are joined
PEEL_SHADOW_SHARE = 0.8  # a part of the labels beyond an outline edge is a contact shadow if this share is shadow...
PEEL_TINT = 4.0  # ...(Lab units: chroma departure from the darkened backdrop, beyond the backdrop's own variation...
PEEL_BOUNCE = 0.5  # ...or up to this share of the piece's beside it, whose light it bounces)...
PEEL_SOFTNESS = 0.6  # ...its rim is less than this share as steep as the edge it hangs from...
PEEL_HALO_SOFTNESS = 0.15  # ...(this share for a halo, a part mostly of the lit backdrop's tone: it has no far edge)...
PEEL_HUG = 3.0  # ...it reaches no further from that edge than this many times its mean thickness along it...
PEEL_ALONG = 2.0  # ...and the edge is this many times longer than that reach
LOOSE_SHARE = 0.02  # loose parts smaller than this share of the piece are dropped if their rim is soft...
LOOSE_SOFTNESS = 0.6  # ...under this share as steep as the piece's
SPECK_SHARE = 2e-5  # components smaller than this share of the image are dropped...
SPECK_RELATIVE = 0.002  # ...and those smaller than this share of the largest component

# Confidence
EDGE_SIGMA = 1.5  # px at the segmentation size: smoothing before outline edges are traced (noise makes none)
EDGE_STEP = 2.0  # Lab units: the least step in colour that counts as an outline edge, however clean the backdrop
PLAUSIBLE_AREA = 0.85  # labels over this share of the frame are the backdrop taken for the piece (not a close-up)
RIM_ERROR_PX = 1.0  # px at the segmentation size: how far the labels' edge typically sits from the true outline
UNEXPLAINED_WEIGHT = 2.0  # confidence falls by 1/e per half a rim length of outline edges left outside the cut
CANNY_HIGH = 100.0  # Canny's high threshold on the rescaled derivatives (the low one, for hysteresis, is half)

# Matte
MATTE_CONTRAST = 12.0  # RGB distance between piece and backdrop colours below which the matting equation is unstable
SHADOW_PRIOR = 1e-3  # weight (relative to |B|²) of the prior that the backdrop behind a band pixel is unshadowed
MATTE_OFF_LINE = 0.3  # distance off the backdrop-piece line, as a share of its length, where reliability falls to 1/e
MATTE_FG_POWERS = (1.0, 4.0)  # local piece colours weighted by (unlikeness to the backdrop) ** power
# The per-pixel alpha is then smoothed by closed-form matting (alpha locally an affine function of colour):
COLOUR_LINE_EPS = 1e-5  # regulariser on each 3×3 window's colour covariance (colours in 0..1)
COLOUR_LINE_PULL = (1.0, 0.1)  # pull of the per-pixel alpha against that smoothing: in thin parts, in wide ones
WIDE_PART = 3.0  # parts whose half-width is 1-2× this many band widths go from thin to wide
SOLVER_TOLERANCE = 1e-3  # conjugate gradients stop at this relative residual...
SOLVER_ITERATIONS = 200  # ...or after this many steps


@dataclass(frozen=True)
class Cutout:
    """A cut-out: `rgba` is H×W×4 uint8 at the input size with straight (not premultiplied) alpha and the colours at
    partially transparent pixels unmixed from the backdrop; `confidence` (0..1) is how sure the method is that the
    cut-out is clean, low meaning a human should look at it."""

    rgba: ByteImage
    confidence: float


def cut_out(rgb: ByteImage) -> Cutout:
    """Cut the jewellery piece out of a product photo on a backdrop.

    `rgb` is an H×W×3 uint8 photo, already upright. Returns the cut-out at the same size.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    scale = min(1.0, SEGMENT_SIDE_PX / max(height, width))
    small_size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small = as_bytes(cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA)) if scale < 1 else rgb
    segmentation = segment(small)
    alpha, colour = matte(rgb, segmentation)
    rgba = np.empty((height, width, 4), np.uint8)  # filled channel by channel: a third of np.dstack's time
    rgba[..., :3], rgba[..., 3] = colour, alpha
    # The confidence's rim term again, on the matte's outline: labels at the segmentation size fill a fine chain's
    # link holes and round its wire up to whole pixels, so the piece is thinner (and a pixel's error along its rim
    # costs more) than they say. Never raised: only what the labels hid counts.
    labelled = rim_precision(segmentation.foreground)
    matted = rim_precision(alpha > 127, pixel=small.shape[0] / height)
    confidence = segmentation.confidence * min(1.0, matted / labelled) if labelled > 0 else segmentation.confidence
    return Cutout(rgba=rgba, confidence=float(confidence))


# ---------------------------------------------------------------------------------------------------------------
# Colour statistics


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture in Lab: weights (K), means (K×3), inverse covariances (K×3×3), log-normalisers (K)."""

    weights: npt.NDArray[np.float64]
    means: npt.NDArray[np.float64]
    precisions: npt.NDArray[np.float64]
    log_norms: npt.NDArray[np.float64]

    def cost(self, flat: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """-log density of each of N Lab colours (N×3), in nats (the best component's, a close upper bound)."""
        best = np.full(flat.shape[0], np.inf, np.float32)
        pixels = np.ascontiguousarray(flat, np.float32).reshape(-1, 1, 3)  # OpenCV's per-pixel affine maps: ~10× numpy
        for k in range(self.weights.size):
            whiten = np.linalg.cholesky(self.precisions[k]).T  # precision = whiten.T @ whiten
            d = cv2.transform(pixels, np.hstack([whiten, -(whiten @ self.means[k])[:, None]]).astype(np.float32))
            offset = -self.log_norms[k] - np.log(self.weights[k])
            half_norm = cv2.transform(cv2.multiply(d, d), np.array([[0.5, 0.5, 0.5, offset]], np.float32))
            np.minimum(best, half_norm.reshape(-1), out=best)
        return best


def fit_mixture(samples: npt.NDArray[np.float32], components: int, floor: float) -> Mixture:
    """Fit a Gaussian mixture by k-means then a few EM steps; deterministic (seeded by farthest points).
    `floor` is the smallest standard deviation allowed per axis (Lab units)."""
    data = samples.astype(np.float64)
    if data.shape[0] > 6000:
        data = data[:: data.shape[0] // 6000 + 1]
    k = max(1, min(components, data.shape[0] // 20))
    centres = [np.median(data, axis=0)]
    distance = np.linalg.norm(data - centres[0], axis=1)
    for _ in range(k - 1):
        centres.append(data[int(np.argmax(distance))])
        distance = np.minimum(distance, np.linalg.norm(data - centres[-1], axis=1))
    means = np.array(centres)
    for _ in range(6):
        labels = np.argmin((means * means).sum(1) - 2 * data @ means.T, axis=1)  # nearest centre: |x|² is common
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=data[:, c], minlength=k) for c in range(3)], axis=1)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], means)
    weights, precisions, log_norms = [], [], []
    for j in range(k):
        members = data[labels == j]
        if members.shape[0] < 4:
            continue
        cov = np.cov(members.T) + np.eye(3) * floor**2
        weights.append(members.shape[0] / data.shape[0])
        precisions.append(np.linalg.inv(cov))
        log_norms.append(-0.5 * (np.log(np.linalg.det(cov)) + 3 * np.log(2 * np.pi)))
        means[j] = members.mean(0)
    keep = [j for j in range(k) if np.count_nonzero(labels == j) >= 4]
    return Mixture(np.array(weights), means[keep], np.array(precisions), np.array(log_norms))


def normalised_blur(values: FloatImage, weights: FloatImage, sigma: float) -> tuple[FloatImage, FloatImage]:
    """Gaussian-weighted mean of `values` over `weights` (and the blurred weight), computed on a reduced grid when
    the blur is wide."""
    h, w = weights.shape
    factor = max(1, int(sigma // 4))
    if factor > 1:
        size = (max(2, w // factor), max(2, h // factor))
        v = cv2.resize(values * weights[..., None], size, interpolation=cv2.INTER_AREA)
        m = cv2.resize(weights, size, interpolation=cv2.INTER_AREA)
        v = cv2.GaussianBlur(v, (0, 0), sigma / factor)
        m = cv2.GaussianBlur(m, (0, 0), sigma / factor)
        v = cv2.resize(v, (w, h), interpolation=cv2.INTER_LINEAR)
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        v = cv2.GaussianBlur(values * weights[..., None], (0, 0), sigma)
        m = cv2.GaussianBlur(weights, (0, 0), sigma)
    return as_float(v).reshape(values.shape), as_float(m)


def lit_field(lab: FloatImage, background: BoolImage) -> FloatImage:
    """The backdrop field as lit, without its shadows: background pixels clearly darker than a first fit are left
    out of a second, so shadows are explained as shadows rather than pulling the field down (which would make the
    lit backdrop next to them look like a highlight)."""
    field = backdrop_field(lab, background)
    brightness = (lab[..., 0] + 16.0) / np.maximum(field[..., 0] + 16.0, 1e-3)
    values = brightness[background]
    spread = max(0.01, float(np.median(np.abs(values - np.median(values)))) * 1.4826)
    lit = background & (brightness > 1.0 - LIT_MARGIN * spread)
    if np.count_nonzero(lit) < 0.5 * np.count_nonzero(background):
        return field
    return backdrop_field(lab, lit)


def polynomial_field(lab: FloatImage, background: BoolImage) -> FloatImage:
    """A quadratic surface per channel fitted to the background pixels: light falloff, a spot's bright centre."""
    h, w = background.shape
    at = np.flatnonzero(background)
    ys, xs = np.divmod(at[:: max(1, at.size // 8000)], w)

    def design(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    ny, nx = ys * 2.0 / h - 1, xs * 2.0 / w - 1
    a = design(ny, nx)
    values = lab[ys, xs].astype(np.float64)
    weights = np.ones(ys.size)
    for _ in range(3):  # reweighted: texture and stray pixels pull less
        sw = np.sqrt(weights)[:, None]
        weighted = a * sw
        coef = np.linalg.solve(weighted.T @ weighted, weighted.T @ (values * sw))  # normal equations: 6 unknowns
        error = np.linalg.norm(values - a @ coef, axis=1)
        weights = 1.0 / np.maximum(1.0, error / max(1e-3, float(np.median(error))))
    # The x y term, plus the terms in y alone and in x alone (broadcast), in float32: a third of the design matrix's
    # time over the grid.
    y = (np.arange(h) * 2.0 / h - 1)[:, None, None]
    x = (np.arange(w) * 2.0 / w - 1)[None, :, None]
    field = as_float(coef[4] * x) * as_float(y)
    field += as_float(coef[0] + coef[2] * y + coef[5] * y * y)
    field += as_float(coef[1] * x + coef[3] * x * x)
    return field


def backdrop_field(lab: FloatImage, background: BoolImage, finest: float | None = None) -> FloatImage:
    """The backdrop's colour everywhere: a quadratic surface, refined by interpolating the background pixels'
    departures from it, wide blurs first, finer ones where there is enough background nearby (push-pull)."""
    base = polynomial_field(lab, background)
    departure = lab - base
    weights = background.astype(np.float32)
    side = max(lab.shape[:2])
    field = np.zeros_like(lab)
    finest = FIELD_FINEST if finest is None else finest
    for sigma in (s * side for s in (1 / 8, 1 / 32, 1 / 96) if s >= finest):
        num, den = normalised_blur(departure, weights, sigma)
        prior = 0.05
        field = (num + prior * field) / (den + prior)[..., None]
    return (base + field).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation


@dataclass(frozen=True)
class Segmentation:
    """What the matte needs from the segmentation, at the segmentation's size."""

    foreground: BoolImage
    backdrop_lab: FloatImage  # the backdrop field, Lab
    confidence: float


def dot(a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]]) -> FloatImage:
    """Per-pixel dot product of colour vectors (sum over the last axis). Two float32 colour images of one shape go
    through OpenCV (a per-pixel product, then the sum as a 1×3 transform: 7× faster than numpy's einsum, itself 3×
    faster than (a * b).sum(-1)); anything else through einsum."""
    if a.size and a.shape == b.shape and a.shape[-1] == 3 and a.dtype == np.float32 and b.dtype == np.float32:
        product = cv2.multiply(np.ascontiguousarray(a).reshape(-1, 1, 3), np.ascontiguousarray(b).reshape(-1, 1, 3))
        return as_float(cv2.transform(product, _CHANNEL_SUM).reshape(a.shape[:-1]))
    return as_float(np.einsum("...i,...i->...", a, b))


_CHANNEL_SUM = np.ones((1, 3), np.float32)


def length(a: npt.NDArray[np.floating[Any]]) -> FloatImage:
    """Per-pixel length of colour vectors."""
    return as_float(np.sqrt(dot(a, a)))


def as_float(image: object) -> FloatImage:
    """OpenCV's results as the float32 arrays they are (its stubs type them loosely)."""
    return np.asarray(image, dtype=np.float32)


def as_bytes(image: object) -> ByteImage:
    return np.asarray(image, dtype=np.uint8)


def as_bool(image: object) -> BoolImage:
    return np.asarray(image, dtype=bool)


def to_lab(rgb: ByteImage) -> FloatImage:
    return as_float(cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB))


def border_sides(shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The four sides of the band along the image border (top, bottom, left, right; they share the corners)."""
    h, w = shape
    b = max(2, round(BORDER_SHARE * min(h, w)))
    return [
        (slice(0, b), slice(None)),
        (slice(h - b, h), slice(None)),
        (slice(None), slice(0, b)),
        (slice(None), slice(w - b, w)),
    ]


def border_band(shape: tuple[int, int]) -> BoolImage:
    band = np.zeros(shape, bool)
    for side in border_sides(shape):
        band[side] = True
    return band


def backdrop_border(lab: FloatImage) -> tuple[BoolImage, FloatImage]:
    """The border band as the first sample of the backdrop, without the sides of it that a piece runs through, and
    the coarse backdrop field fitted to it.

    Every threshold of the first guess is calibrated on this sample at its BACKDROP_QUANTILE, so a chain running
    through one side of the band (a necklace spread to the edge of the frame) lifts them all, and a faint piece is
    then lost from the first cut on. A side whose departures from the band's field reach more than BORDER_SIDE_RATIO
    times the median of the other sides' (and than that times EDGE_STEP: below it they are noise however they compare)
    is left out, while what is left is most of the band."""
    border = border_band(lab.shape[:2])
    field = backdrop_field(lab, border, finest=1 / 8)
    departure = length(lab - field)
    sides = border_sides(lab.shape[:2])
    tails = np.array([np.quantile(departure[side], BACKDROP_QUANTILE) for side in sides])
    usual = [max(float(np.median(np.delete(tails, i))), EDGE_STEP) for i in range(len(sides))]
    clean = [side for side, tail, others in zip(sides, tails, usual, strict=True) if tail <= BORDER_SIDE_RATIO * others]
    if len(clean) == len(sides):
        return border, field
    kept = np.zeros_like(border)
    for side in clean:
        kept[side] = True
    if np.count_nonzero(kept) <= 0.5 * np.count_nonzero(border):
        return border, field
    return kept, backdrop_field(lab, kept, finest=1 / 8)


def robust_spread(values: npt.NDArray[np.float32], floor: float) -> tuple[float, float]:
    centre = float(np.median(values))
    return centre, max(floor, float(np.median(np.abs(values - centre))) * 1.4826)


def field_evidence(lab: FloatImage, field: FloatImage, reference: BoolImage) -> tuple[FloatImage, BoolImage, BoolImage]:
    """Log-likelihood ratio (nats, > 0 favours the piece) from how each pixel departs from the backdrop field.

    Three departures are evidence of the piece: a different chroma (after the best uniform darkening), brighter than
    the backdrop (a highlight), and darker in a structure too thin to be a shadow (a chain, a prong, an outline).
    Each is calibrated on the backdrop itself: its value at the backdrop's BACKDROP_QUANTILE is the threshold, so a
    textured backdrop (grain lines, weave) raises its own bar. Darker with the backdrop's chroma is what a shadow
    looks like, and also what grey metal looks like: that gets only a weak vote, growing with depth, and the
    contrast term decides.

    Also returns which pixels look like a shadow (darker than the lit backdrop, by no more than the deepest shadow
    explained) and which are darker than the lit backdrop at all."""
    v = lab + np.array([16.0, 0, 0], np.float32)
    f = field + np.array([16.0, 0, 0], np.float32)
    level = dot(v, f) / np.maximum(dot(f, f), 1e-6)
    across = (v - level[..., None] * f).astype(np.float32)
    at = np.flatnonzero(reference)
    sample = across.reshape(-1, 3)[at[:: at.size // 20000 + 1] if at.size > 20000 else at]
    precision = np.linalg.inv(np.cov(sample.T.astype(np.float64)) + np.eye(3) * CHROMA_NOISE_FLOOR**2)
    whiten = np.linalg.cholesky(precision).astype(np.float32)
    whitened = across @ whiten
    chroma = np.sqrt(dot(whitened, whitened))
    if SHADOW_SATURATION > 0:
        # In shadow a coloured backdrop is lit by light it reflected itself: darker and more saturated. Fit lightness
        # and chroma scales separately; within the allowed boost the remaining departure is what counts.
        light = v[..., 0] * f[..., 0] / np.maximum(f[..., 0] * f[..., 0], 1e-6)
        a, b = f[..., 1], f[..., 2]
        tone = (v[..., 1] * a + v[..., 2] * b) / np.maximum(a * a + b * b, 1e-6)
        tone = np.clip(tone, light, light * (1 + SHADOW_SATURATION * np.clip(1 - light, 0, 1) / (1 - SHADOW_MIN_SCALE)))
        boosted = (v - f * np.stack([light, tone, tone], axis=-1)) @ whiten
        chroma = np.where(light < 1, np.minimum(chroma, np.sqrt(dot(boosted, boosted))), chroma)

    brightness = np.log(np.maximum(level, 1e-3)).astype(np.float32)
    lit, lit_spread = robust_spread(brightness[reference], LEVEL_NOISE_FLOOR)
    above = np.maximum(brightness - lit, 0)

    darkest = np.log(SHADOW_MIN_SCALE)
    clamped = np.clip(brightness - lit, darkest, 0).astype(np.float32)
    reach = max(3, round(SHADOW_MIN_WIDTH * max(lab.shape[:2]))) | 1
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach))
    closed = cv2.morphologyEx(clamped, cv2.MORPH_CLOSE, disk)

    # Shadows on a real set pick up the colour of light bounced off the piece: the deeper, the more tint allowed.
    depth = 1.0 - np.exp(closed)  # 0 lit .. about 0.45 at the deepest shadow explained (Lab scale)
    chroma = chroma / (1.0 + depth * (SHADOW_TINT / CHROMA_FLOOR))
    z = np.zeros_like(chroma)
    for channel, floor in ((chroma, CHROMA_FLOOR), (above, LEVEL_FLOOR)):
        bar = max(floor, float(np.quantile(channel[reference], BACKDROP_QUANTILE)))
        z = np.maximum(z, channel * (EVIDENCE_THRESHOLD / bar))
    # Thin darkening is a chain or a prong only between backdrop on both sides: along the piece's own edge it is
    # its contact shadow. So the piece (by its other evidence) walls the valleys in before they are closed.
    walled = np.where(z > EVIDENCE_THRESHOLD, darkest, clamped).astype(np.float32)
    thin = np.where(z > EVIDENCE_THRESHOLD, 0, cv2.morphologyEx(walled, cv2.MORPH_CLOSE, disk) - clamped)
    bar = max(THIN_FLOOR, float(np.quantile(thin[reference], BACKDROP_QUANTILE)))
    z = np.maximum(z, thin * (EVIDENCE_THRESHOLD / bar))
    piece = 0.5 * (z * z - EVIDENCE_THRESHOLD**2)
    darker = brightness - lit < -EVIDENCE_THRESHOLD * lit_spread
    shadowed = np.where(darker, np.clip(SHADOW_BIAS + SHADOW_DEPTH_GAIN * depth, -2.0, 2.0), -LIT_WEIGHT)
    unary = as_float(np.where(piece > 0, np.minimum(piece, UNARY_CAP), np.maximum(piece, shadowed)))
    return unary, as_bool(darker & (brightness - lit > darkest)), as_bool(darker)


def shadowed_samples(lab: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Backdrop colours as they would look in shadow too (Lab scale of L+16, a, b from 1 down to the deepest
    shadow), so a colour model of the backdrop doesn't take its own shadows for the piece."""
    scales = np.linspace(1.0, SHADOW_MIN_SCALE, 4, dtype=np.float32)
    offset = np.array([16.0, 0, 0], np.float32)
    every = lab[:: max(1, lab.shape[0] // 4000)]
    return np.concatenate([(every + offset) * k - offset for k in scales])


def segment(small: ByteImage) -> Segmentation:
    """Label the piece in a photo already reduced to the segmentation size.

    Per pixel, a dim region with the backdrop's chroma is a shadow or a part of the piece (grey metal, a clear
    stone) alike, and a tinted contact shadow can look like the piece's own dim colours. So the cut is made under
    two hypotheses, and the one whose result the image supports better (`assess`: above all, an outline that is
    an edge all round with no edges running on outside it) is kept:

    - lenient: the colour mixtures may vote for the piece anywhere, and regions enclosed by steep edges near the
      piece are filled when narrow or busy (grey metal, a clear stone's facets, a thin band);
    - strict: in shadow-like pixels the colour mixtures may only vote against the piece (a shadow fading into the
      backdrop is then left to the field evidence and the contrast term), and the piece's outline is closed with
      thin edges that touch it (so a stone's facets are still filled).

    When even the better of the two is unsure (a band polished like a mirror shows the backdrop over much of its
    body, and its outline doesn't close), a third is tried if it changes anything: the better cut with its convex
    outline completed and the hole seen through it kept (`complete_outline`), given one more round to settle.
    """
    lab = to_lab(as_bytes(cv2.GaussianBlur(small, (0, 0), 0.8)))
    border, field = backdrop_border(lab)
    pairwise = contrast_weights(lab)
    outline = outline_edges(lab, border)
    # First guess: what departs from a coarse field predicted from the border alone, kept only where it has a
    # visible outline (a fold in velvet or a swell of light departs too, but softly).
    seeds = outlined(field_evidence(lab, field, border)[0] > SEED_EVIDENCE, steep_edges(lab, border))
    background = ~cv2.dilate(seeds.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    first = learn(lab, background, None)
    if first is None:
        return Segmentation(np.zeros(lab.shape[:2], bool), lit_field(lab, background), 0.0)
    with ThreadPoolExecutor(2) as pool:  # in two threads: numpy and OpenCV release the GIL for much of the work
        hypotheses = list(
            pool.map(lambda strict: cut(lab, background, first, pairwise, outline, strict=strict), (False, True))
        )
    best = max(hypotheses, key=lambda segmentation: segmentation.confidence)
    if best.confidence < COMPLETE_BELOW:
        completed = complete_outline(best.foreground, outline)
        if np.any(completed != best.foreground):
            strict = best is hypotheses[1]
            hypotheses.append(cut(lab, background, first, pairwise, outline, strict=strict, start=completed))
    chosen = max(hypotheses, key=lambda segmentation: segmentation.confidence)
    darker = shaded(lab, chosen.foreground, chosen.backdrop_lab)
    shadowless = peel_contact_shadows(lab, chosen.foreground, chosen.backdrop_lab, outline, darker)
    peeled = drop_soft_specks(shadowless, lab)
    if chosen is hypotheses[-1] and len(hypotheses) == 3:
        peeled = band_outline(peeled)  # the completed cut of a mirror-polished piece: restore a band's lost faces
    # The outline term of the confidence again, for the labels as they now are: a peeled shadow's own outline runs on
    # beyond the piece, and so do the texture edges a shadow brings out in cloth, which says nothing of the piece.
    # Only when a shadow was peeled (a speck or a stray pixel is none): otherwise the edges in shade (darker veins in
    # marble, folds in cloth) are as much the backdrop's as any, and the cut's own confidence stands.
    if np.count_nonzero(chosen.foreground & ~shadowless) < MIN_PIECE_PX:
        return Segmentation(peeled, chosen.backdrop_lab, chosen.confidence)
    shade = cv2.dilate(darker.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    was = outline_explained(chosen.foreground, outline)
    confidence = float(np.clip(chosen.confidence * outline_explained(peeled, outline, shade) / was, 0.0, 1.0))
    return Segmentation(peeled, chosen.backdrop_lab, confidence)


def shaded(lab: FloatImage, foreground: BoolImage, field: FloatImage) -> BoolImage:
    """Which pixels are darker than the lit backdrop, however deep, judged on the backdrop away from the labels."""
    around = ~cv2.dilate(foreground.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return field_evidence(lab, field, around)[2]


def peel_contact_shadows(
    lab: FloatImage, foreground: BoolImage, field: FloatImage, outline: BoolImage, darker: BoolImage | None = None
) -> BoolImage:
    """The labels without the contact shadows they took in beyond the piece's own outline. `darker` is which pixels
    are darker than the lit backdrop, judged on the backdrop away from the labels (`shaded`); worked out if not given.

    Right under a pearl or a bead the shadow is deep, thin and nearly the backdrop's colour: the field evidence
    takes it for a thin dark part of the piece (a chain looks the same per pixel). But the piece's silhouette runs
    between them as a sharp outline edge, and the shadow's far side fades into the backdrop, where a chain's is as
    sharp as its near side. So the labels are split along the outline edges, and a part is dropped when:

    - it is smaller than a part it borders across an edge, and lies along that edge (a bead hanging from a short
      stretch of it, or a wire running away from it, is not a contact shadow);
    - nearly all of it looks like a shadow: no brighter than the lit backdrop (however deep: right where the piece
      touches, no light gets in) and of the backdrop's chroma give or take PEEL_TINT, the backdrop's own variation
      and light bounced off the piece;
    - its rim against the backdrop is less than PEEL_SOFTNESS as steep as the edge it hangs from.

    A halo is dropped too: where a photo is not reduced for the segmentation, JPEG's ringing round a small saturated
    stone tints the backdrop beside it by more than the clean border's bar, in blobs up to a chroma block (16 px)
    wide. Such a part has the lit backdrop's tone rather than a shadow's, and no far edge at all: its rim must be less
    than PEEL_HALO_SOFTNESS as steep as the edge (a shadow's far side is 0.3-0.6 of it, and a strip of grey metal
    beyond an inner edge is no less), and its shape is not asked about."""
    if not foreground.any():
        return foreground
    parts = foreground & ~outline
    count, labels, boxes, _ = cv2.connectedComponentsWithStats(parts.astype(np.uint8), connectivity=4)
    if count <= 2:
        return foreground

    def near(mask: BoolImage, size: int = 3) -> BoolImage:
        return as_bool(cv2.dilate(mask.astype(np.uint8), np.ones((size, size), np.uint8)))

    area = np.bincount(labels[parts], minlength=count)
    # Each part's largest neighbour across an edge (its own area counts too: a part is not larger than itself).
    area_image = np.where(parts, area[labels], 0).astype(np.float32)
    edges = foreground & outline
    largest_near_edge = np.where(edges, cv2.dilate(area_image, np.ones((5, 5), np.uint8)), 0)
    across = cv2.dilate(largest_near_edge, np.ones((5, 5), np.uint8))
    largest_neighbour = np.zeros(count, np.float32)
    np.maximum.at(largest_neighbour, labels[parts].astype(np.intp), across[parts])
    background = ~near(foreground, 5)
    light = (lab[..., 0] + 16.0) / np.maximum(field[..., 0] + 16.0, 1e-3)
    tint = length(lab[..., 1:] - field[..., 1:] * light[..., None])
    # however deep: right at the contact no light gets in
    darker = shaded(lab, foreground, field) if darker is None else darker
    shadow = darker | (light < np.exp(LEVEL_FLOOR))  # no brighter than the lit backdrop
    shadow_share = np.bincount(labels[parts], weights=shadow[parts], minlength=count) / np.maximum(area, 1)
    halo = np.bincount(labels[parts], weights=darker[parts], minlength=count) <= PEEL_SHADOW_SHARE * area
    own_tint = float(np.quantile(tint[background], BACKDROP_QUANTILE)) if background.any() else 0.0
    candidates = np.flatnonzero((shadow_share > PEEL_SHADOW_SHARE) & (largest_neighbour > area))
    candidates = candidates[candidates > 0]
    if candidates.size == 0:
        return foreground
    steepness = steepness_of(lab)
    by_backdrop = near(~foreground)
    height, width = foreground.shape
    soft = []
    for index in candidates:
        x, y, w, h = boxes[index, :4]
        box = (slice(max(0, y - 2), min(height, y + h + 2)), slice(max(0, x - 2), min(width, x + w + 2)))
        part = labels[box] == index
        rim = part & by_backdrop[box]
        larger = area[labels[box]] * parts[box] > area[index]
        edge = edges[box] & near(part) & near(larger, 5)  # the edge it hangs from, not its own inner edges
        if not (rim.any() and edge.any()):
            continue
        # Its colour: the backdrop's, darker, give or take the backdrop's own variation and light bounced off the
        # piece beside it.
        beside = larger & near(edge, 7) & ~edges[box]
        limit = PEEL_TINT + own_tint
        if beside.any():
            limit = max(limit, PEEL_BOUNCE * float(np.median(tint[box][beside])))
        if np.mean(shadow[box][part] & (tint[box][part] < limit)) <= PEEL_SHADOW_SHARE:
            continue
        # A contact shadow lies along the edge it hangs from, about as thick all along; a dark wire with its own
        # shadow runs away from it, and a bead hangs from a short stretch of it. A halo has no shape of its own (it
        # comes in JPEG's blocks): its want of any far edge tells it from the piece.
        reach = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)[part].max()
        along = np.count_nonzero(edge)
        if not halo[index] and (reach > PEEL_HUG * area[index] / along or PEEL_ALONG * reach > along):
            continue
        softness = PEEL_HALO_SOFTNESS if halo[index] else PEEL_SOFTNESS
        if np.median(steepness[box][rim]) < softness * np.median(steepness[box][edge]):
            soft.append(index)
    if not soft:
        return foreground
    drop = np.zeros(count, bool)
    drop[soft] = True
    dropped = foreground & drop[labels]
    kept = foreground & ~dropped
    # Edge pixels that now border nothing but the backdrop were the shadow's, not the piece's silhouette.
    kept &= ~(outline & ~near(kept & ~outline))
    # So were the slivers the shadow alone joined to the piece (its tips, cut off by its own edges): what is left
    # beside the dropped parts as a component of its own, smaller than they are.
    count, pieces, stats, _ = cv2.connectedComponentsWithStats(kept.astype(np.uint8), connectivity=8)
    beside = np.zeros(count, bool)
    beside[pieces[near(dropped) & kept]] = True
    beside[0] = False
    sliver = beside & (stats[:, cv2.CC_STAT_AREA] < np.count_nonzero(dropped))
    return as_bool(kept & ~sliver[pieces])


@dataclass(frozen=True)
class Model:
    """What a round of the cut learns from its current background (and foreground)."""

    field: FloatImage  # the lit backdrop field, Lab
    unary: FloatImage  # field evidence, nats (> 0 favours the piece)
    shadow_like: BoolImage  # darker than the lit backdrop, within the depth of a shadow
    backdrop_colours: Mixture
    piece_colours: Mixture


def learn(lab: FloatImage, background: BoolImage, foreground: BoolImage | None) -> Model | None:
    """The backdrop field, the field evidence and both colour mixtures; None if there is nothing to learn the
    piece's colours from. Without a `foreground` (the first round) the piece's colours come from the pixels of
    strong evidence; after that from its labels where the evidence doesn't speak against them, so a shadow
    wrongly taken in last round does not teach the model its colour."""
    field = lit_field(lab, background)
    unary, shadow_like, _ = field_evidence(lab, field, background)
    if foreground is None:
        known = unary > SEED_EVIDENCE
    else:
        known = foreground & (unary > PIECE_MODEL_EVIDENCE)
        if np.count_nonzero(known) < MIN_PIECE_PX:
            known = foreground
    if np.count_nonzero(known) < MIN_PIECE_PX:
        return None
    backdrop_colours = fit_mixture(shadowed_samples(lab[background]), GMM_COMPONENTS, floor=1.0)
    piece_colours = fit_mixture(lab[known], GMM_COMPONENTS, floor=1.5)
    return Model(field, unary, shadow_like, backdrop_colours, piece_colours)


def cut(
    lab: FloatImage,
    background: BoolImage,
    first: Model,
    pairwise: Pairwise,
    outline: BoolImage,
    *,
    strict: bool,
    start: BoolImage | None = None,
) -> Segmentation:
    """CUT_ROUNDS rounds of: graph cut on the field evidence plus the colour mixtures' vote, outline closure, then
    the field, evidence and mixtures learnt again from the new labels. `first` is the first round's model (the same
    for both hypotheses); `strict` is the hypothesis described in `segment`.

    With `start` (labels whose outline was completed) it is one round, learnt from those labels, with the outline
    completed again after the closure."""
    shape = lab.shape[:2]
    border = border_band(shape)
    foreground = previous = np.zeros(shape, bool) if start is None else start
    if start is not None:
        background = ~cv2.dilate(start.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    model: Model | None = first
    unary = first.unary
    for round_ in range(CUT_ROUNDS if start is None else 1):
        if round_ or start is not None:
            model = learn(lab, background, foreground)
        if model is None:
            return Segmentation(np.zeros(shape, bool), first.field, 0.0)
        quiet = model.shadow_like if strict else np.zeros(shape, bool)
        unary = model.unary + colour_term(lab, model.unary, model.backdrop_colours, model.piece_colours, quiet)
        unary[border & (unary < 0)] = -1e3
        previous = foreground
        steep = steep_edges(lab, background)
        foreground = outlined(drop_specks(graph_cut(unary, pairwise)), steep)
        foreground = close_outline(foreground, steep, outline if strict else None, bridge=start is not None)
        if start is not None:
            foreground = complete_outline(foreground, outline)
        background = ~cv2.dilate(foreground.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    if model is None or np.count_nonzero(foreground) < MIN_PIECE_PX:
        return Segmentation(np.zeros(shape, bool), first.field, 0.0)
    return Segmentation(foreground, model.field, assess(foreground, previous, unary, border, outline))


def colour_term(lab: FloatImage, unary: FloatImage, backdrop: Mixture, piece: Mixture, quiet: BoolImage) -> FloatImage:
    """The colour mixtures' vote (nats, > 0 favours the piece), capped at COLOUR_CAP either way; at `quiet` pixels
    it may only vote against the piece.

    It is evaluated only where it can change the cut: pixels whose field evidence is so low that even the largest
    vote leaves them outside the graph (and more than the graph's dilation away from any that enter) get the
    largest vote against instead, which changes nothing but saves most of the work."""
    reachable = (unary > -(GRAPH_MARGIN + COLOUR_CAP)).astype(np.uint8)
    where = cv2.dilate(reachable, np.ones((5, 5), np.uint8)).astype(bool)
    vote = np.full(unary.shape, -COLOUR_CAP, np.float32)
    colours = lab[where]
    vote[where] = np.clip(backdrop.cost(colours) - piece.cost(colours), -COLOUR_CAP, COLOUR_CAP)
    return as_float(np.where(quiet, np.minimum(vote, 0), vote))


def assess(foreground: BoolImage, previous: BoolImage, unary: FloatImage, border: BoolImage, edges: BoolImage) -> float:
    """How clean the cut-out is likely to be, 0..1, from what the segmentation itself shows: labels that kept
    moving between rounds, a boundary region where the evidence is weak or contradicts the labels, piece touching
    the image border (a backdrop that didn't fit, or a crop), an implausible size, many fragments, a thin piece
    (a pixel of error along its rim is a large share of it), and outline edges that run on outside the cut.

    The last is the main sign of a cut that went wrong: the piece's outline is an edge, so edges continuing the
    cut's outline beyond it mean a part of the piece was missed (polished metal mirroring the backdrop) or the cut
    follows something else (a shadow taken in, where the backdrop's texture edges run on under it)."""
    area = int(np.count_nonzero(foreground)) / foreground.size
    union = int(np.count_nonzero(foreground | previous))
    stability = int(np.count_nonzero(foreground & previous)) / union if union else 0.0
    ring = cv2.dilate(foreground.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    ring &= ~cv2.erode(foreground.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    agrees = np.where(foreground, unary > 1.0, unary < -1.0)
    clarity = int(np.count_nonzero(agrees & ring)) / max(1, int(np.count_nonzero(ring)))
    touching = int(np.count_nonzero(foreground & border)) / max(1, int(np.count_nonzero(border)))
    framing = float(np.clip(1.0 - 8.0 * touching, 0.0, 1.0))
    size = float(np.clip((area - 2e-4) / 1e-3, 0, 1) * np.clip((PLAUSIBLE_AREA - area) / 0.25, 0, 1))
    stats = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)[2]
    areas = stats[1:, cv2.CC_STAT_AREA]
    dust = float(areas[areas < 0.01 * areas.sum()].sum() / max(1, areas.sum()))
    fragments = float(np.clip(1.0 - 10.0 * dust, 0.0, 1.0))
    precision = rim_precision(foreground)
    quality = stability**2 * clarity * framing * size * fragments * precision * outline_explained(foreground, edges)
    return float(np.clip(quality, 0.0, 1.0))


def rim_precision(mask: BoolImage, pixel: float = 1.0) -> float:
    """The share of a piece left right by an error of RIM_ERROR_PX all along its rim: 1 - that error over the
    piece's half-width (a band w wide and L long has area w L and a rim 2 L long). `pixel` is the size of one of
    the mask's pixels in pixels of the segmentation size, where RIM_ERROR_PX is measured."""
    rim = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    rim_length = max(1.0, np.count_nonzero(rim) / 2)
    half_width = np.count_nonzero(mask) / rim_length * pixel
    return float(np.clip(1.0 - RIM_ERROR_PX / max(half_width, 1e-9), 0.0, 1.0))


def drop_soft_specks(foreground: BoolImage, lab: FloatImage) -> BoolImage:
    """The labels without small loose parts whose rim is much softer than the piece's: a swell of light on cloth, a
    speck of soft shadow with no outline of its own. A part smaller than LOOSE_SHARE of the largest is dropped when
    the median steepness along its rim is under LOOSE_SOFTNESS of that along the largest's (a second stud or a
    detached stone has a rim as crisp as the piece's)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)
    if count <= 2:
        return foreground
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0
    largest = int(np.argmax(areas))
    small = areas < LOOSE_SHARE * areas[largest]
    small[0] = False
    if not small.any():
        return foreground
    # each part's rim: its own edge pixels and the backdrop pixels beside it
    grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
    edge = foreground & (cv2.erode(foreground.astype(np.uint8), np.ones((3, 3), np.uint8)) == 0)
    rims = np.where(edge, labels, np.where(foreground, 0, grown))
    steepness = np.zeros(count)
    steepness[1:] = ndimage.median(steepness_of(lab), rims, np.arange(1, count))
    soft = small & (steepness < LOOSE_SOFTNESS * steepness[largest])
    return as_bool(foreground & ~soft[labels])


def outline_explained(foreground: BoolImage, edges: BoolImage, shade: BoolImage | None = None) -> float:
    """exp(-UNEXPLAINED_WEIGHT × the length of the `edges` that touch the labels and run on beyond them, in rim
    lengths), not counting those in `shade`."""
    labels = foreground.astype(np.uint8)
    rim_length = max(1.0, np.count_nonzero(cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))) / 2)
    near = cv2.dilate(labels, np.ones((5, 5), np.uint8)).astype(bool)
    count, pieces = cv2.connectedComponents(edges.astype(np.uint8), connectivity=8)
    attached = np.zeros(count, bool)
    attached[pieces[near & edges]] = True
    attached[0] = False
    running_on = attached[pieces] & ~near
    if shade is not None:
        running_on &= ~shade
    return float(np.exp(-UNEXPLAINED_WEIGHT * np.count_nonzero(running_on) / rim_length))


def outline_edges(lab: FloatImage, reference: BoolImage) -> BoolImage:
    """Thin edges (Canny on the Lab gradient after a little smoothing) stronger than any but the rarest on the
    `reference` backdrop pixels and than a step of EDGE_STEP: where an outline can be."""
    smooth = cv2.GaussianBlur(lab, (0, 0), EDGE_SIGMA)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    strength = gx * gx + gy * gy
    strongest = np.argmax(strength, axis=-1)[..., None]  # Canny follows the channel that changes most
    dx = np.take_along_axis(gx, strongest, -1)[..., 0]
    dy = np.take_along_axis(gy, strongest, -1)[..., 0]
    magnitude = np.sqrt(strength[..., 0] + strength[..., 1] + strength[..., 2])
    step_response = 8.0 / (EDGE_SIGMA * np.sqrt(2 * np.pi))  # 3×3 Sobel on a unit step blurred by EDGE_SIGMA
    high = max(float(np.quantile(magnitude[reference], BACKDROP_QUANTILE)), EDGE_STEP * step_response)
    scale = CANNY_HIGH / high  # Canny wants integer derivatives: the high threshold lands on CANNY_HIGH
    dx16 = np.round(dx * scale).astype(np.int16)
    dy16 = np.round(dy * scale).astype(np.int16)
    return as_bool(cv2.Canny(dx16, dy16, CANNY_HIGH / 2, CANNY_HIGH, L2gradient=True) > 0)


def steepness_of(lab: FloatImage) -> FloatImage:
    """Per pixel, the length of the Lab gradient (3×3 Sobel)."""
    gx = as_float(cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3))
    gy = as_float(cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3))
    return as_float(np.sqrt(dot(gx, gx) + dot(gy, gy)))


def steep_edges(lab: FloatImage, reference: BoolImage) -> BoolImage:
    """Pixels whose gradient is steeper than nearly all of the backdrop's own."""
    steepness = steepness_of(lab)
    return as_bool(steepness > np.quantile(steepness[reference], OUTLINE_QUANTILE))


def close_outline(
    foreground: BoolImage, steep: BoolImage, outline: BoolImage | None, *, bridge: bool = False
) -> BoolImage:
    """Fill what the piece's outline encloses, except true holes.

    Polished metal can mirror the backdrop so exactly that only its outline shows: steep edges connected to the piece
    close such regions. An enclosed region stays background (the inside of a ring, a chain loop) if it is wide and
    as smooth as the backdrop; a thin sliver between outlines, or a busy region (the facets of a clear stone), is
    filled. With `bridge`, edges that stop just short of the labels are joined to them first (`bridge_gaps`)."""
    side = max(foreground.shape)
    if outline is None:
        near = cv2.dilate(foreground.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        reach = max(3, round(OUTLINE_REACH * side)) | 1
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach))
        edges = (steep & (cv2.dilate(foreground.astype(np.uint8), disk) > 0)).astype(np.uint8)
    else:
        near = cv2.dilate(foreground.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        edges = outline.astype(np.uint8)
    count, labels = cv2.connectedComponents(edges, connectivity=8)
    touching = np.zeros(count, bool)
    touching[labels[near & (edges > 0)]] = True
    touching[0] = False
    attached = touching[labels]
    closed = foreground | attached
    if bridge:
        closed |= bridge_gaps(foreground, attached)
    count, labels = cv2.connectedComponents((~closed).astype(np.uint8), connectivity=4)
    outside = np.zeros(count, bool)
    outside[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    depth = cv2.distanceTransform((~closed).astype(np.uint8), cv2.DIST_L2, 3)
    widest = np.zeros(count, np.float32)
    np.maximum.at(widest, labels.ravel(), depth.ravel())
    # Busy is judged in the region's core: the enclosing edges bleed a pixel or two into it, and along its rim run
    # the piece's own contact shadow and reflections, while a stone's facets cross it through.
    core = depth > np.maximum(2.0, HOLE_CORE * widest[labels])
    size = np.bincount(labels[core], minlength=count).astype(np.float64)
    busy = np.bincount(labels[core], weights=steep[core], minlength=count) / np.maximum(size, 1)
    fill = ~outside & ((widest < HOLE_MIN_RADIUS * side) | (busy > HOLE_MAX_BUSY))
    fill[0] = False
    filled = fill[labels] & ~closed
    seam = attached & cv2.dilate(filled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return as_bool(foreground | filled | seam)


def bridge_gaps(foreground: BoolImage, edges: BoolImage) -> BoolImage:
    """Straight joins from each free end of `edges` that stops within BRIDGE_GAP of the labels to the nearest label
    pixel. Where a mirror-polished face meets the backdrop its outline edge fades out for a few pixels, so the
    sliver of face between it and the labels leaks out to the backdrop through the gap."""
    height, width = foreground.shape
    gap = max(1, round(BRIDGE_GAP * max(height, width)))
    lines = edges.astype(np.uint8)
    neighbours = cv2.filter2D(lines, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT) - lines
    distance = cv2.distanceTransform((~foreground).astype(np.uint8), cv2.DIST_L2, 5)
    ends = (lines > 0) & (neighbours == 1) & (distance > 1.5) & (distance <= gap)
    joins = np.zeros((height, width), np.uint8)
    for y, x in zip(*np.nonzero(ends), strict=True):
        top, left = max(0, y - gap), max(0, x - gap)
        window = foreground[top : y + gap + 1, left : x + gap + 1]
        wy, wx = np.nonzero(window)
        if wy.size:
            nearest = int(np.argmin((wy + top - y) ** 2 + (wx + left - x) ** 2))
            cv2.line(joins, (int(x), int(y)), (int(wx[nearest] + left), int(wy[nearest] + top)), 1, 1)
    return as_bool(joins)


def band_outline(labels: BoolImage) -> BoolImage:
    """The labels with the faces of a band (a ring, a bangle) that mirror the backdrop restored from its outline.

    A band seen at an angle is a short cylinder: its outline is the hull of two ellipses, its near and far rims, one
    the other shifted and (in perspective) scaled a little, and the hole seen through it is where the two rims' inner
    ellipses overlap. That shape is fitted to the labels' outer contour and to the contour of their largest hole
    (`fit_band`), forgiving the outer contour for falling inside the outline (where a face mirrors the backdrop, the
    labels stop short of it) more than for running outside it. If at least BAND_PRESENT of the outer contour is no
    more than BAND_TRIM_PX inside the outline, and BAND_FIT_SHARE of that part is within BAND_FIT_PX of it, the
    parts of the outline beyond the labels that reach BAND_FACE_DEPTH deep somewhere (a face, not a rim's jitter) are
    added, up to BAND_MAX_ADDED of the labels, and the labels' other holes under
    BAND_PINHOLE_SHARE of them are filled (a plain band has one hole; pinholes are where a face mirrors the backdrop).
    Labels whose largest hole is under BAND_HOLE_SHARE of their outline are no band."""
    contours, hierarchy = cv2.findContours(labels.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return labels
    parents = [int(parent) for parent in hierarchy[0][:, 3]]
    piece = max((i for i, parent in enumerate(parents) if parent < 0), key=lambda i: cv2.contourArea(contours[i]))
    holes = [i for i, parent in enumerate(parents) if parent == piece]
    if contours[piece].shape[0] < 40 or not holes:
        return labels
    hole = max(holes, key=lambda i: cv2.contourArea(contours[i]))
    if cv2.contourArea(contours[hole]) < BAND_HOLE_SHARE * cv2.contourArea(contours[piece]):
        return labels
    outline, fits = fit_band(contours[piece][:, 0, :].astype(np.float64), contours[hole][:, 0, :].astype(np.float64))
    present = fits > -BAND_TRIM_PX
    if np.mean(present) < BAND_PRESENT or np.mean(np.abs(fits[present]) <= BAND_FIT_PX) < BAND_FIT_SHARE:
        return labels
    model = np.zeros(labels.shape, np.uint8)
    cv2.fillConvexPoly(model, cv2.convexHull(np.round(outline).astype(np.int32)), 1)
    filled = np.zeros(labels.shape, np.uint8)
    cv2.drawContours(filled, contours, piece, 1, -1)
    beyond = (model > 0) & (filled == 0)
    count, parts = cv2.connectedComponents(beyond.astype(np.uint8), connectivity=8)
    deepest = np.zeros(count, np.float32)
    np.maximum.at(deepest, parts.ravel(), cv2.distanceTransform(beyond.astype(np.uint8), cv2.DIST_L2, 3).ravel())
    faces = deepest >= BAND_FACE_DEPTH
    faces[0] = False
    added = faces[parts]
    if np.count_nonzero(added) > BAND_MAX_ADDED * np.count_nonzero(labels):
        return labels
    pinholes = np.zeros(labels.shape, np.uint8)
    for other in holes:
        if other != hole and cv2.contourArea(contours[other]) < BAND_PINHOLE_SHARE * np.count_nonzero(labels):
            cv2.drawContours(pinholes, contours, other, 1, -1)
    return as_bool(labels | added | (pinholes > 0))


def fit_band(
    contour: npt.NDArray[np.float64], hole: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A band fitted to its outer `contour` and its `hole`'s (points, N×2). Returns points on its two rims (whose
    convex hull is its outline) and each contour point's signed distance from the outline (> 0 outside).

    The band is an ellipse (centre, semi-axes, angle) for the near rim, the same ellipse shifted and scaled for the
    far one, and both scaled about their centres by the band's inner-to-outer ratio for the rims' inner edges: nine
    parameters. A convex shape's signed distance is max over directions u of (p·u − h(u)), h its support function
    (c·u + k |diag(a, b) Rᵀu| for an ellipse); the outline's h is the larger of the rims', the hole's distance the
    larger of the inner ellipses'. Least squares with a soft L1 loss, outer distances inside the outline weighted by
    BAND_INSIDE_WEIGHT, the far rim's scale within BAND_BOUNDS, from the contour's own ellipse with the far rim
    shifted a little in four directions half round (a shift and its opposite give the same band; with no shift the
    two rims tie and the shift gets no gradient); then once more without the contour points more than BAND_TRIM_PX
    inside the outline (lost faces), which the soft loss still lets pull it inwards."""
    points = contour[:: max(1, contour.shape[0] // 400)]
    inner = hole[:: max(1, hole.shape[0] // 300)]
    angles = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    ux, uy = np.cos(angles), np.sin(angles)
    directions = np.stack([ux, uy])
    zero = np.zeros_like(ux)

    def supports(params: npt.NDArray[np.float64]) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """h(u) over the directions and its derivatives by the parameters, for the near rim, the far rim and their
        inner edges."""
        cx, cy, a, b, theta, tx, ty, scale, ratio = params
        first = ux * math.cos(theta) + uy * math.sin(theta)  # u on the ellipse's axes
        second = uy * math.cos(theta) - ux * math.sin(theta)
        base = np.maximum(np.sqrt((a * first) ** 2 + (b * second) ** 2), 1e-9)
        shape = np.stack([a * first**2 / base, b * second**2 / base, (a * a - b * b) * first * second / base])
        near = cx * ux + cy * uy
        far = (cx + tx) * ux + (cy + ty) * uy
        return [
            (near + base, np.vstack([ux, uy, shape, zero, zero, zero, zero])),
            (far + scale * base, np.vstack([ux, uy, scale * shape, ux, uy, base, zero])),
            (near + ratio * base, np.vstack([ux, uy, ratio * shape, zero, zero, zero, base])),
            (
                far + ratio * scale * base,
                np.vstack([ux, uy, ratio * scale * shape, ux, uy, ratio * base, scale * base]),
            ),
        ]

    def signed(
        at: npt.NDArray[np.float64], shapes: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]], union: bool
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Signed distances of `at` from the hull of `shapes` (union) or their overlap, and their derivatives."""
        if union:
            further = shapes[1][0] > shapes[0][0]
            h, grads = np.where(further, shapes[1][0], shapes[0][0]), np.where(further, shapes[1][1], shapes[0][1])
            shapes = [(h, grads)]
        found = []
        for h, grads in shapes:
            gaps = at @ directions - h
            best = np.argmax(gaps, axis=1)
            found.append((np.take_along_axis(gaps, best[:, None], axis=1)[:, 0], -grads[:, best].T))
        if len(found) == 1:
            return found[0]
        deeper = found[1][0] > found[0][0]
        return np.where(deeper, found[1][0], found[0][0]), np.where(deeper[:, None], found[1][1], found[0][1])

    def evaluate(
        params: npt.NDArray[np.float64], outline_points: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        shapes = supports(params)
        outer, outer_grads = signed(outline_points, shapes[:2], union=True)
        weight = np.where(outer > 0, 1.0, BAND_INSIDE_WEIGHT)
        hole_distance, hole_grads = signed(inner, shapes[2:], union=False)
        return (
            np.concatenate([weight * outer, hole_distance]),
            np.vstack([weight[:, None] * outer_grads, hole_grads]),
        )

    (ex, ey), (width, height), degrees = cv2.fitEllipse(contour.astype(np.float32))
    shift = BAND_START_SHIFT * max(width, height)

    def solve(
        start: npt.NDArray[np.float64], steps: int, outline_points: npt.NDArray[np.float64] = points
    ) -> optimize.OptimizeResult:
        last: dict[bytes, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}

        def cached(params: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
            """`evaluate` once per parameters: the solver asks for the residuals, then the Jacobian, at each."""
            key = params.tobytes()
            if key not in last:
                last.clear()
                last[key] = evaluate(params, outline_points)
            return last[key]

        return optimize.least_squares(
            lambda params: cached(params)[0],
            start,
            jac=lambda params: cached(params)[1],
            bounds=BAND_BOUNDS,
            loss="soft_l1",
            f_scale=1.0,
            max_nfev=steps,
        )

    best_fit = None
    for angle in np.linspace(0, np.pi, 4, endpoint=False):
        sx, sy = shift * math.cos(angle), shift * math.sin(angle)
        start = np.array([ex - sx / 2, ey - sy / 2, width / 2, height / 2, math.radians(degrees), sx, sy, 1.0, 0.8])
        fit = solve(start, BAND_SCOUT_STEPS)
        if best_fit is None or fit.cost < best_fit.cost:
            best_fit = fit
    assert best_fit is not None
    best_fit = solve(best_fit.x, 100)
    # Refitted without the outline's stretches far inside the band (its lost faces), which only pulled it in.
    kept = signed(points, supports(best_fit.x)[:2], union=True)[0] > -BAND_TRIM_PX
    if 0 < np.count_nonzero(kept) < points.shape[0]:
        best_fit = solve(best_fit.x, 100, points[kept])
    cx, cy, a, b, theta, tx, ty, scale, _ = best_fit.x
    round_ = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    rims = []
    for (ox, oy), k in (((cx, cy), 1.0), ((cx + tx, cy + ty), scale)):
        x = ox + k * (a * np.cos(round_) * math.cos(theta) - b * np.sin(round_) * math.sin(theta))
        y = oy + k * (a * np.cos(round_) * math.sin(theta) + b * np.sin(round_) * math.cos(theta))
        rims.append(np.stack([x, y], axis=1))
    return np.concatenate(rims), signed(points, supports(best_fit.x)[:2], union=True)[0]


def complete_outline(foreground: BoolImage, outline: BoolImage) -> BoolImage:
    """The labels with their convex outline completed, keeping the holes seen through the piece.

    A band polished like a mirror shows the backdrop over much of its body, so its labels are pieces of a ring
    whose outline doesn't close and whose hole runs out through the gaps. Inside the labels' convex hull, every
    region between the labels and the outline edges that touches the hull's rim and is wide (narrow ones are left to
    `close_outline`) is looked at from its middle (`visible_hole`): if nearly every ray from there ends on an edge it
    is a hole seen through the piece, and what lies beyond the hole's own edge is the piece; otherwise it is open to
    the outside (between two pieces, inside a C) and stays as it is. Regions the labels already enclose are holes
    `close_outline` kept, and are left alone too."""
    if not foreground.any():
        return foreground
    side = max(foreground.shape)
    hull = np.zeros(foreground.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(foreground.astype(np.uint8))), 1)
    inside = hull.astype(bool)
    barrier = foreground | (outline & inside)
    region = inside & ~barrier
    count, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=4)
    rim = inside & ~cv2.erode(hull, np.ones((3, 3), np.uint8)).astype(bool)
    open_to_rim = np.zeros(count, bool)
    open_to_rim[labels[rim & region]] = True
    depth = cv2.distanceTransform((~barrier).astype(np.uint8), cv2.DIST_L2, 3)
    widest = np.zeros(count, np.float32)
    np.maximum.at(widest, labels.ravel(), depth.ravel())
    candidates = open_to_rim & (widest >= HOLE_MIN_RADIUS * side)
    candidates[0] = False
    added = np.zeros(foreground.shape, bool)
    for index in np.flatnonzero(candidates):
        component = labels == index
        hole, open_share = visible_hole(component, barrier, inside)
        if open_share <= HOLE_OPEN_SHARE:
            added |= component & ~hole
    if not added.any():
        return foreground
    seam = outline & inside & cv2.dilate(added.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return as_bool(foreground | added | seam)


def visible_hole(region: BoolImage, barrier: BoolImage, inside: BoolImage) -> tuple[BoolImage, float]:
    """The hole in `region` as seen from its deepest point, and the share of rays from there that leave `inside`
    without meeting the `barrier` (the region is open to the outside, not a hole, when that is large).

    Each of HOLE_RAYS rays runs to the first barrier pixel or out of `inside`. A ray that went through a chink in the
    hole's edge runs on far beyond its neighbours and is cut back to their median; a stretch of rays that went
    through a wider gap (`leaked_rays`) is cut back to the reach interpolated between the rays on either side that
    end on the hole's edge (`edge_across_gaps`). The hole is the polygon of the rays' ends."""
    height, width = region.shape
    depth = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
    cy, cx = np.unravel_index(int(np.argmax(depth)), depth.shape)
    angles = np.linspace(0, 2 * np.pi, HOLE_RAYS, endpoint=False)
    steps = np.arange(math.ceil(math.hypot(height, width)))
    xs = np.round(cx + np.cos(angles)[:, None] * steps).astype(np.intp)
    ys = np.round(cy + np.sin(angles)[:, None] * steps).astype(np.intp)
    on_image = (xs >= 0) & (ys >= 0) & (xs < width) & (ys < height)
    xs, ys = np.clip(xs, 0, width - 1), np.clip(ys, 0, height - 1)
    ends = np.argmax(barrier[ys, xs] | ~inside[ys, xs] | ~on_image, axis=1)
    rays = np.arange(HOLE_RAYS)
    open_share = float(np.mean(~barrier[ys[rays, ends], xs[rays, ends]]))
    reach = ends.astype(np.float64)
    reach = np.minimum(reach, ndimage.median_filter(reach, size=HOLE_SPIKE_RAYS, mode="wrap"))
    leaked = leaked_rays(reach)
    if leaked.any():
        across = edge_across_gaps((float(cx), float(cy)), angles, reach, ~leaked)
        reach[leaked] = np.minimum(reach[leaked], across[leaked])
    polygon = np.stack([cx + np.cos(angles) * reach, cy + np.sin(angles) * reach], axis=1)
    hole = np.zeros(region.shape, np.uint8)
    cv2.fillPoly(hole, [np.round(polygon).astype(np.int32)], 1)
    return as_bool(hole), open_share


def edge_across_gaps(
    centre: tuple[float, float], angles: npt.NDArray[np.float64], reach: npt.NDArray[np.float64], kept: BoolImage
) -> npt.NDArray[np.float64]:
    """How far each ray would run to the hole's edge, from the `kept` rays that end on it.

    The inside of a ring or a loop seen at an angle is close to an ellipse: if one fits the kept rays' ends to within
    HOLE_ELLIPSE_FIT pixels (after a second fit without those far inside the first, which end on something in front
    of the edge), the ellipse is the edge across the gaps; if not, the reach is interpolated round the circle."""
    known = np.flatnonzero(kept)
    across = np.interp(angles, angles[known], reach[known], period=2 * np.pi)
    fit = known
    for _ in range(2):
        if fit.size < 5:
            break
        ends = np.stack([centre[0] + np.cos(angles[fit]) * reach[fit], centre[1] + np.sin(angles[fit]) * reach[fit]])
        along = ellipse_reach(cv2.fitEllipse(ends.T.astype(np.float32)), centre, angles)
        if along is None:
            break
        if np.median(np.abs(reach[fit] - along[fit])) <= HOLE_ELLIPSE_FIT:
            across = along
        fit = known[reach[known] > along[known] - max(HOLE_JUMP_PX, HOLE_JUMP * float(np.median(reach)))]
    return across


def ellipse_reach(
    ellipse: tuple[Sequence[float], Sequence[float], float],
    centre: tuple[float, float],
    angles: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64] | None:
    """How far rays from `centre` at `angles` run to the edge of an ellipse as OpenCV gives it (centre, full axes,
    degrees), or None if the centre is not inside it."""
    (ex, ey), (width, height), degrees = ellipse
    if min(width, height) <= 2:
        return None
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    dx, dy = centre[0] - ex, centre[1] - ey
    u, v = (dx * cos + dy * sin) / (width / 2), (dy * cos - dx * sin) / (height / 2)
    if u * u + v * v >= 1:
        return None
    du = (np.cos(angles) * cos + np.sin(angles) * sin) / (width / 2)
    dv = (np.sin(angles) * cos - np.cos(angles) * sin) / (height / 2)
    # (u + t du)² + (v + t dv)² = 1, for the root t > 0
    a, b, c = du * du + dv * dv, u * du + v * dv, u * u + v * v - 1
    return np.asarray((np.sqrt(b * b - a * c) - b) / a, np.float64)


def leaked_rays(reach: npt.NDArray[np.float64]) -> BoolImage:
    """The rays (reaches in order round the circle) that went through a gap in the hole's edge.

    Where consecutive rays differ by more than HOLE_JUMP of the median reach, one stretch of rays ends and another
    begins: the farther stretch either went through a gap in the hole's edge or runs past something in front of the
    edge (a bead hanging into the hole, whose edge is real). Which it is can only be told from the stretches around:
    the longest stretch ends on the hole's edge, and so does any stretch nearer than both its neighbours. From
    those, a stretch that runs farther than a trusted neighbour, and is shorter than it, leaked; one nearer than a
    trusted neighbour is trusted too, and one farther than a leaked neighbour leaked too."""
    count = reach.size
    leaked = np.zeros(count, bool)
    step = np.roll(reach, -1) - reach  # from each ray to the next
    breaks = np.flatnonzero(np.abs(step) > max(HOLE_JUMP_PX, HOLE_JUMP * float(np.median(reach))))
    if breaks.size < 2:
        return leaked
    # stretch k runs from just after breaks[k] to breaks[k + 1], round the circle
    starts = (breaks + 1) % count
    lengths = (np.roll(breaks, -1) - starts) % count + 1
    stretches = breaks.size
    farther_than_before = step[breaks] > 0
    farther_than_after = np.roll(step[breaks], -1) < 0
    state = np.zeros(stretches, np.int8)  # 1 ends on the hole's edge, -1 leaked, 0 not known yet
    state[~farther_than_before & ~farther_than_after] = 1
    state[np.argmax(lengths)] = 1
    changed = True
    while changed:
        changed = False
        for k in np.flatnonzero(state == 0):
            around = (((k - 1) % stretches, farther_than_before[k]), ((k + 1) % stretches, farther_than_after[k]))
            for other, farther in around:
                if state[other] == 1 and not farther:
                    state[k] = 1
                elif farther and (state[other] == -1 or (state[other] == 1 and lengths[k] < lengths[other])):
                    state[k] = -1
                else:
                    continue
                changed = True
                break
    for k in np.flatnonzero(state == -1):
        leaked[np.arange(starts[k], starts[k] + lengths[k]) % count] = True
    return as_bool(leaked)


def outlined(candidates: BoolImage, steep: BoolImage) -> BoolImage:
    """The candidate regions whose outline is an edge: at least a share of their boundary is steep, or next to a
    steep pixel (a coloured piece's chroma bleeds a pixel or two past its edge in a JPEG, and where the backdrop has
    sharp lines of its own the bar for steep is too high for that blurred fringe)."""
    grown = cv2.dilate(candidates.astype(np.uint8), np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    rim = (cv2.morphologyEx(grown, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0) & (labels > 0)
    steep = as_bool(cv2.dilate(steep.astype(np.uint8), np.ones((3, 3), np.uint8)))
    rim_total = np.bincount(labels[rim], minlength=count)
    rim_steep = np.bincount(labels[rim], weights=steep[rim], minlength=count)
    keep = rim_steep >= OUTLINE_SHARE * np.maximum(rim_total, 1)
    keep[0] = False
    return as_bool(candidates & keep[labels])


def drop_specks(mask: BoolImage) -> BoolImage:
    """Remove foreground components too small to be part of a piece (noise, dust, a stray texture blob): below a
    floor in pixels, or tiny beside the largest component."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    largest = int(areas[1:].max()) if count > 1 else 0
    smallest = max(6, round(SPECK_SHARE * mask.size), round(SPECK_RELATIVE * largest))
    keep = areas >= smallest
    keep[0] = False
    return as_bool(keep[labels])


@dataclass(frozen=True)
class Pairwise:
    right: FloatImage  # weight between (y, x) and (y, x+1), H×(W-1)
    down: FloatImage  # weight between (y, x) and (y+1, x), (H-1)×W


def contrast_weights(lab: FloatImage) -> Pairwise:
    """Contrast-sensitive smoothness (as in GrabCut): neighbours that differ little, relative to the image's mean
    squared difference between neighbours, are expensive to separate."""
    across, down = lab[:, 1:] - lab[:, :-1], lab[1:] - lab[:-1]
    dx, dy = dot(across, across), dot(down, down)
    beta = 1.0 / (2.0 * (float(np.mean(np.concatenate([dx.ravel(), dy.ravel()]))) + 1e-3))
    return Pairwise(SMOOTHNESS * np.exp(-beta * dx), SMOOTHNESS * np.exp(-beta * dy))


def graph_cut(unary: FloatImage, pairwise: Pairwise) -> BoolImage:
    """Minimum cut: True where labelling foreground is cheaper. `unary` > 0 favours foreground.

    Boykov-Kolmogorov max-flow (PyMaxflow) on the 4-connected pixel grid, capacities in integers. Only the box around
    the pixels near anything that could be foreground enters the graph, and pixels in it that are not near any are
    tied to the backdrop (their links to the rest become part of its cost of being foreground)."""
    h, w = unary.shape
    candidate = (unary > -GRAPH_MARGIN).astype(np.uint8)
    active = cv2.dilate(candidate, np.ones((5, 5), np.uint8))
    result = np.zeros((h, w), bool)
    if not np.any(active):
        return result
    x, y, box_w, box_h = cv2.boundingRect(active)
    top, left = max(0, y - 1), max(0, x - 1)  # a ring of tied pixels round the box, where the image goes on
    box = np.s_[top : min(h, y + box_h + 1), left : min(w, x + box_w + 1)]
    unary = unary[box]
    rows, cols = unary.shape
    index = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)
    graph = maxflow.GraphInt(rows * cols, 2 * rows * cols)
    graph.add_nodes(rows * cols)
    for weights, here, there in (
        (pairwise.right[box[0], left : left + cols - 1], index[:, :-1], index[:, 1:]),
        (pairwise.down[top : top + rows - 1, box[1]], index[:-1], index[1:]),
    ):
        capacities = np.round(weights * CAPACITY_SCALE).astype(np.int32).ravel()
        graph.add_edges(here.ravel(), there.ravel(), capacities, capacities)
    to_source = np.round(np.maximum(unary, 0) * CAPACITY_SCALE).astype(np.int32)
    to_sink = np.round(np.maximum(-unary, 0) * CAPACITY_SCALE).astype(np.int32)
    tied = active[box] == 0
    to_source[tied], to_sink[tied] = 0, TIED
    graph.add_grid_tedges(index, to_source, to_sink)
    graph.maxflow()
    result[box] = ~graph.get_grid_segments(index)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Matte and defringe


def local_mean(rgb: FloatImage, weights: FloatImage, sigma: float) -> tuple[FloatImage, FloatImage]:
    """Weighted local mean colour and the local weight mass."""
    num = as_float(cv2.GaussianBlur(rgb * weights[..., None], (0, 0), sigma))
    den = as_float(cv2.GaussianBlur(weights, (0, 0), sigma))
    return as_float(num / np.maximum(den, 1e-6)[..., None]), den


def matte(rgb: ByteImage, segmentation: Segmentation) -> tuple[ByteImage, ByteImage]:
    """Alpha and defringed colour at full size from the segmentation's labels.

    In a band around the label boundary (as wide as the segmentation's pixels, plus a margin), alpha solves the
    matting equation I = a F + (1 - a) s B with B the local backdrop colour (from sure-background pixels nearby), s
    its darkening in the piece's shadow, and F the local piece colour (from the pixels least like the backdrop
    nearby, so a chain thinner than the band still has one). That per-pixel alpha is then smoothed by closed-form
    matting (alpha locally an affine function of colour), which also carries it across where F and B are too alike
    for the equation to be stable.
    B and F are smooth, so they are estimated at no more than MATTE_SIDE_PX, in a box around the piece with room for
    the widest filter, and sampled at the full image's band pixels; the equation itself is solved at every band
    pixel of the full image."""
    height, width = rgb.shape[:2]
    scale = min(1.0, MATTE_SIDE_PX / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small_h, small_w = segmentation.foreground.shape
    upscale = max(size[1] / small_h, size[0] / small_w)
    piece = as_float(cv2.resize(segmentation.foreground.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)) > 0.5
    alpha = np.zeros((height, width), np.float32)
    colour = rgb.copy()
    ys, xs = np.nonzero(piece)
    if ys.size == 0:
        return alpha.astype(np.uint8), colour
    reach = int(np.ceil(upscale)) + 1
    sigma = 1.5 * reach
    margin = int(np.ceil(4 * sigma)) + 2 * reach + 2
    top, bottom = max(0, int(ys.min()) - margin), min(size[1], int(ys.max()) + 1 + margin)
    left, right = max(0, int(xs.min()) - margin), min(size[0], int(xs.max()) + 1 + margin)
    work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    work_box: ByteImage = np.asarray(work[top:bottom, left:right], np.uint8)
    image = work_box.astype(np.float32)
    labels = piece[top:bottom, left:right].astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    sure_fg = cv2.erode(labels, kernel).astype(np.float32)
    sure_bg = cv2.erode(1 - labels, kernel).astype(np.float32)
    # half-width of the part nearby, for how far the colour-line smoothing may override the per-pixel alpha
    nearby = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (8 * reach + 1, 8 * reach + 1))
    half_width = as_float(cv2.dilate(cv2.distanceTransform(labels, cv2.DIST_L2, 3), nearby))
    unknown = (1 - sure_fg) * (1 - sure_bg)

    backdrop, bg_mass = local_mean(image, sure_bg, sigma)
    field_rgb = as_float(cv2.cvtColor(segmentation.backdrop_lab, cv2.COLOR_LAB2RGB)) * 255.0
    field_rgb = as_float(cv2.resize(field_rgb, size, interpolation=cv2.INTER_LINEAR))[top:bottom, left:right]
    near = np.clip(bg_mass / 0.05, 0, 1)[..., None]
    backdrop = near * backdrop + (1 - near) * field_rgb
    # Weighting by unlikeness to the backdrop: a too-wide label band or a chain with no sure pixels still yields
    # the piece's own colour rather than a mix.
    difference = length(image - backdrop) / 255.0
    region = sure_fg + unknown
    candidates = [local_mean(image, region * difference**power + 1e-9, sigma)[0] for power in MATTE_FG_POWERS]
    # and the highlights: metal brighter than the backdrop
    brighter = np.maximum(image.mean(-1) - backdrop.mean(-1), 0) / 255.0
    highlight, mass = local_mean(image, region * brighter**2, sigma)
    has = (mass > 1e-4)[..., None]
    candidates.append(np.where(has, highlight, candidates[0]).astype(np.float32))

    # The full image's pixels that fall in the box, and where each sits in it (as INTER_LINEAR would place it).
    sx, sy = size[0] / width, size[1] / height
    full_top, full_left = int(np.ceil((top + 0.5) / sy - 0.5)), int(np.ceil((left + 0.5) / sx - 0.5))
    full_bottom = min(height, int(np.floor((bottom - 1.5) / sy - 0.5)) + 1)
    full_right = min(width, int(np.floor((right - 1.5) / sx - 0.5)) + 1)
    grid_y = ((np.arange(full_top, full_bottom) + 0.5) * sy - 0.5 - top).astype(np.float32)
    grid_x = ((np.arange(full_left, full_right) + 0.5) * sx - 0.5 - left).astype(np.float32)
    map_x, map_y = np.meshgrid(grid_x, grid_y)
    box = (slice(full_top, full_bottom), slice(full_left, full_right))
    alpha[box] = np.clip(remap(sure_fg, map_x, map_y), 0, 1)
    box_unknown = remap(unknown, map_x, map_y)
    band_y, band_x = np.nonzero(box_unknown > 0)
    at_x, at_y = map_x[band_y, band_x], map_y[band_y, band_x]
    band = (band_y + full_top, band_x + full_left)

    def sample(image: FloatImage) -> FloatImage:
        return remap(image, at_x, at_y)

    def pull_of(reliable: FloatImage, half_width: FloatImage) -> FloatImage:
        """How hard the colour-line smoothing holds each pixel to its own alpha: as hard as that is reliable, and
        harder in thin parts (a chain's alpha is all band)."""
        wide = np.clip(half_width / (WIDE_PART * reach) - 1, 0, 1)
        thin_pull, wide_pull = COLOUR_LINE_PULL
        return as_float((thin_pull * (1 - wide) + wide_pull * wide) * reliable)

    at = rgb[band].astype(np.float32)
    b = sample(backdrop)
    solved, f, seen, reliable = explain(at, b, [sample(candidate) for candidate in candidates])
    # Each pixel's own solution is noisy where the estimates of F and B are off (a shadow taken for a mix with dark
    # metal, a highlight for the backdrop): the colour-line model smooths it across pixels.
    if scale < 1:
        # A large photo is smoothed at the working size, where a 3×3 window spans as much of a soft edge as it
        # does in a photo of that size and there are a quarter of the pixels to solve: the change the smoothing
        # makes to the per-pixel alpha there is carried to the full-size band pixels.
        work_y, work_x = np.nonzero(unknown > 0)
        work_solved, _, _, work_reliable = explain(
            image[work_y, work_x], backdrop[work_y, work_x], [candidate[work_y, work_x] for candidate in candidates]
        )
        smoothed = colour_line_matte(
            work_box,
            sure_fg,
            (work_y, work_x),
            work_solved,
            pull_of(work_reliable, half_width[work_y, work_x]),
        )
        change = np.zeros_like(unknown)
        change[work_y, work_x] = smoothed - work_solved
        a = np.clip(solved + sample(change), 0, 1)
    else:
        a = colour_line_matte(rgb, alpha, band, solved, pull_of(reliable, sample(half_width)))
    weight = box_unknown[band_y, band_x]
    a = weight * a + (1 - weight) * alpha[band]
    alpha[band] = a
    # Defringe: unmix the backdrop (as seen, in the piece's shadow) where alpha is large enough to divide by, the
    # local piece colour elsewhere.
    unmixed = seen + (at - seen) / np.maximum(a, 0.05)[:, None]
    trust = np.clip((a - 0.15) / 0.5, 0, 1)[:, None]
    colour[band] = np.clip(trust * unmixed + (1 - trust) * f, 0, 255).round().astype(np.uint8)
    rounded = np.zeros((height, width), np.uint8)
    rounded[box] = (alpha[box] * 255).round()  # alpha is 0 outside the box
    return rounded, colour


def explain(
    at: FloatImage, b: FloatImage, candidates: list[FloatImage]
) -> tuple[FloatImage, FloatImage, FloatImage, FloatImage]:
    """Per pixel of colour `at` near local backdrop colour `b`: alpha, the piece colour F used, the backdrop as seen
    behind the pixel, and how reliable that alpha is (0..1).

    The pixel is I = aF + (1 - a)sB: the piece over the backdrop, which the piece may shadow (s < 1). A mix with the
    piece moves the pixel towards F's colour and a shadow only darkens B, so colour tells them apart: a grey shadow
    beside gold stays backdrop. Where F is only a brighter or darker B (silver on white) it cannot, and a weak
    prior that the backdrop is unshadowed (SHADOW_PRIOR) decides.

    Metal is shaded: of a few estimates of the local piece colour (from the mean of the piece's pixels to the ones
    least like the backdrop), each pixel takes the one that explains it best."""
    d = at - b
    bb = dot(b, b)
    db = dot(d, b)
    best_error = np.full(b.shape[0], np.inf, np.float32)
    f = np.zeros_like(b)
    solved = np.zeros(b.shape[0], np.float32)
    darkening = np.zeros(b.shape[0], np.float32)
    for c in candidates:
        c_span = c - b
        c_span2 = np.maximum(dot(c_span, c_span), 1e-3)
        projected = dot(d, c_span)
        # d = a (F - B) + v B with v = (1 - a)(s - 1) < 0, by least squares with the prior's penalty on v: taken where
        # it is physical (0 <= a <= 1, 0 <= s < 1), so where the pixel is part piece and part shadowed backdrop.
        # Elsewhere, the plain mix d = a (F - B) (a shadow alone comes out a little above a = 0 under the prior).
        along = dot(c_span, b)
        b_weight = bb * (1 + SHADOW_PRIOR)
        determinant = np.maximum(c_span2 * b_weight - along * along, 1e-6)
        joint_alpha = (b_weight * projected - along * db) / determinant
        joint_v = (c_span2 * db - along * projected) / determinant
        shadowed = (joint_v < 0) & (joint_alpha >= 0) & (joint_alpha <= 1) & (joint_alpha - 1 <= joint_v)
        c_alpha = np.where(shadowed, joint_alpha, np.clip(projected / c_span2, 0, 1))
        c_v = np.where(shadowed, joint_v, 0)
        error = length(d - c_alpha[:, None] * c_span - c_v[:, None] * b) / np.sqrt(c_span2)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        solved = np.where(better, c_alpha, solved)
        darkening = np.where(better, c_v, darkening)
        f = np.where(better[:, None], c, f)
    span = f - b
    span2 = dot(span, span)
    reliable = span2 / (span2 + MATTE_CONTRAST**2)
    # A pixel far off the line between backdrop and piece colour (a highlight on metal shaded unlike its
    # neighbours) is not explained by this pair: its neighbours decide there instead.
    off_line = length(d - solved[:, None] * span - darkening[:, None] * b)
    reliable *= np.exp(-((off_line / (MATTE_OFF_LINE * np.sqrt(span2) + MATTE_CONTRAST)) ** 2))
    shade = np.clip(1 + darkening / np.maximum(1 - solved, 1e-3), 0, 1)
    return solved, f, as_float(shade[:, None] * b), as_float(reliable)


def colour_line_matte(
    rgb: ByteImage,
    alpha: FloatImage,
    band: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]],
    prior: FloatImage,
    pull: FloatImage,
) -> FloatImage:
    """Alpha at the band pixels by Levin et al.'s closed-form matting: in every 3×3 window alpha is close to an
    affine function of colour (the matting Laplacian), the pixels outside the band keep `alpha`, and each band pixel
    is pulled towards `prior` by `pull`."""
    height, width = alpha.shape
    band_y, band_x = band
    n = band_y.size
    if n == 0:
        return np.zeros(0, np.float32)
    # A crop two pixels wider than the band all round, padded where it runs off the image, so that every pixel
    # within two of a band pixel has a flat index in it.
    top, left = int(band_y.min()) - 2, int(band_x.min()) - 2
    bottom, right = int(band_y.max()) + 3, int(band_x.max()) + 3
    crop_h, crop_w = bottom - top, right - left
    inner = (slice(max(0, top), min(height, bottom)), slice(max(0, left), min(width, right)))
    padding = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
    pixels = cv2.copyMakeBorder(rgb[inner], *padding, cv2.BORDER_CONSTANT, value=0)
    image = as_float(pixels) / 255.0
    outside = as_float(cv2.copyMakeBorder(alpha[inner], *padding, cv2.BORDER_CONSTANT, value=0)).ravel()
    y, x = band_y - top, band_x - left
    at = y * crop_w + x  # each band pixel's flat index in the crop

    # The windows: every 3×3 window wholly inside the image that holds a band pixel, by its centre.
    in_band = np.zeros((crop_h, crop_w), np.uint8)
    in_band[y, x] = 1
    centres = cv2.dilate(in_band, np.ones((3, 3), np.uint8))
    centres[: max(0, 1 - top)], centres[max(0, height - 1 - top) :] = 0, 0
    centres[:, : max(0, 1 - left)], centres[:, max(0, width - 1 - left) :] = 0, 0
    cy, cx = np.nonzero(centres)
    window = np.full(crop_h * crop_w, -1, np.int64)
    window[cy * crop_w + cx] = np.arange(cy.size)
    dy9, dx9 = (v.ravel() for v in np.mgrid[-1:2, -1:2])
    # K×9×3, in double precision: nearly grey windows are nearly singular, and their inverse needs the digits
    colours = pixels[cy[:, None] + dy9, cx[:, None] + dx9] / 255.0
    mean = colours.mean(1)
    centred = colours - mean[:, None]
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    s00, s01, s02, s11, s12, s22 = ((centred[..., i] * centred[..., j]).mean(1) for i, j in pairs)
    s00, s11, s22 = s00 + COLOUR_LINE_EPS / 9, s11 + COLOUR_LINE_EPS / 9, s22 + COLOUR_LINE_EPS / 9
    cofactors = (
        s11 * s22 - s12 * s12,
        s02 * s12 - s01 * s22,
        s01 * s12 - s02 * s11,
        s00 * s22 - s02 * s02,
        s01 * s02 - s00 * s12,
        s00 * s11 - s01 * s01,
    )
    determinant = s00 * cofactors[0] + s01 * cofactors[1] + s02 * cofactors[2]
    # per window: the inverse covariance's six entries, then the mean colour, padded with a row for "no window"
    stats = np.zeros((cy.size + 1, 9), np.float32)
    stats[:-1, :6] = np.stack(cofactors, -1) / determinant[:, None]
    stats[:-1, 6:] = mean

    # The pixels within two of each band pixel (5×5, flat indices), and their colours channel by channel.
    oy, ox = np.mgrid[-2:3, -2:3]
    neighbours = at[:, None] + (oy * crop_w + ox).ravel()
    near = [image[..., channel].ravel()[neighbours].reshape(n, 5, 5) for channel in range(3)]
    own = image[y, x]
    window_sums = np.zeros((n, 5, 5), np.float32)  # the Laplacian's row for each band pixel, by offset
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            # the window centred at (pixel - d): its members sit at offsets -1-d .. 1-d from the pixel
            k = window[at - (dy * crop_w + dx)]
            params = stats[k]  # k = -1 picks the zero row: no window, no terms
            d00, d01, d02, d11, d12, d22 = (params[:, i] for i in range(6))
            v = own - params[:, 6:]  # q = inverse covariance × (own colour - window mean)
            q0 = d00 * v[:, 0] + d01 * v[:, 1] + d02 * v[:, 2]
            q1 = d01 * v[:, 0] + d11 * v[:, 1] + d12 * v[:, 2]
            q2 = d02 * v[:, 0] + d12 * v[:, 1] + d22 * v[:, 2]
            qmu = q0 * params[:, 6] + q1 * params[:, 7] + q2 * params[:, 8]
            rows, cols = slice(1 - dy, 4 - dy), slice(1 - dx, 4 - dx)
            affinity = (
                q0[:, None, None] * near[0][:, rows, cols]
                + q1[:, None, None] * near[1][:, rows, cols]
                + q2[:, None, None] * near[2][:, rows, cols]
                + (1 - qmu)[:, None, None]
            ) / 9
            present = (k >= 0).astype(np.float32)[:, None, None]
            window_sums[:, rows, cols] -= present * affinity
            window_sums[:, 2, 2] += present[:, 0, 0]
    stencil = window_sums.reshape(n, 25)
    index = np.full(crop_h * crop_w, -1, np.int64)
    index[at] = np.arange(n)
    columns = index[neighbours]
    known = columns < 0
    rhs = pull * prior - (stencil * np.where(known, outside[neighbours], 0)).sum(1)
    stencil[:, 12] += pull
    keep = ~known & (stencil != 0)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))])
    matrix = csr_matrix((stencil[keep], columns[keep], indptr), shape=(n, n))
    # Symmetric and positive definite: conjugate gradients from the prior, preconditioned by the diagonal, need
    # tens of steps where a direct solve of a 2048 px photo's band takes seconds.
    solution, _ = cg(
        matrix,
        rhs.astype(np.float64),
        x0=prior.astype(np.float64),
        rtol=SOLVER_TOLERANCE,
        maxiter=SOLVER_ITERATIONS,
        M=diags(1 / np.maximum(stencil[:, 12], 1e-9).astype(np.float64)),
    )
    return as_float(np.clip(solution, 0, 1))


def remap(image: FloatImage, map_x: FloatImage, map_y: FloatImage) -> FloatImage:
    """`image` sampled bilinearly at (map_x, map_y), maps of any shape (OpenCV's remap wants them under 32767 a
    side, so long lists of points are folded into rows)."""
    shape = map_x.shape
    if map_x.ndim == 2 and max(shape) < 32767:
        return as_float(cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    n = map_x.size
    if n == 0:
        return np.zeros(shape + image.shape[2:], np.float32)
    row = 4096
    pad = -n % row
    fold_x = np.concatenate([map_x.ravel(), np.zeros(pad, np.float32)]).reshape(-1, row)
    fold_y = np.concatenate([map_y.ravel(), np.zeros(pad, np.float32)]).reshape(-1, row)
    out = as_float(cv2.remap(image, fold_x, fold_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    return out.reshape((-1, *image.shape[2:]))[:n].reshape(shape + image.shape[2:])


# ---------------------------------------------------------------------------------------------------------------------
# Scenes and the marketplace image

SCENE_KEYS = ("stone", "velvet", "marble", "charcoal")
SCENE_FILL = 0.64  # the piece's longer side as a share of the frame, the same in every scene
SCENE_FRAME_PX = 2048  # the scenes are squares of this side
MAX_CUTOUT_SIDE_PX = 2048  # photos are cut out at no more than this (longer side): the scenes never need more
MARKETPLACE_FRAME_PX = 2000  # the marketplace image: a square of this side...
MARKETPLACE_FILL = 0.85  # ...with the piece's longer side filling this share of it
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


def render_scene(cutout: ByteImage, scene: str, frame_px: int = SCENE_FRAME_PX) -> ByteImage:
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


def render_marketplace(
    cutout: ByteImage, frame_px: int = MARKETPLACE_FRAME_PX, fill: float = MARKETPLACE_FILL
) -> ByteImage:
    """Pure white square image (every pixel outside the piece exactly 255,255,255). Only the piece's box is blended
    in floating point; the rest is filled white directly (a 2000² float canvas would be 48 MB per render)."""
    placement = place_piece(cutout, frame_px, fill)
    h, w = placement.piece.shape[:2]
    out = np.full((frame_px, frame_px, 3), 255, np.uint8)
    out[placement.y : placement.y + h, placement.x : placement.x + w] = _composite(
        np.ones((h, w, 3), np.float32), Placement(piece=placement.piece, x=0, y=0)
    )
    return out


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


# ---------------------------------------------------------------------------------------------------------------------
# The local providers: the cut-out and the scenes behind the protocols of `ai_clients.py`, in worker threads


class LocalBackgroundRemover:
    """Cuts the piece out on this machine (`cut_out`), in a worker thread; photos are first reduced to at most
    `MAX_CUTOUT_SIDE_PX`, which the scenes never exceed."""

    name = "local"

    def __init__(self, *, limiter: asyncio.Semaphore) -> None:
        self._limiter = limiter

    async def remove_background(self, image: bytes) -> CutoutResult:
        async with self._limiter:
            return await asyncio.to_thread(self._cut, image)

    @staticmethod
    def _cut(image: bytes) -> CutoutResult:
        rgb = images.decode_rgb(image)
        scale = MAX_CUTOUT_SIDE_PX / max(rgb.shape[:2])
        if scale < 1:
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            rgb = np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
        result = cut_out(rgb)
        if int(result.rgba[..., 3].max()) == 0:
            raise ProviderRejected("local", "no piece could be found in the photo")
        return CutoutResult(image=images.encode_png(result.rgba), confidence=round(float(result.confidence), 3))


class LocalVariantGenerator:
    """Renders the four scenes on this machine around the cut-out's own, unchanged pixels."""

    name = "local"

    def __init__(self, *, limiter: asyncio.Semaphore, frame_px: int = SCENE_FRAME_PX) -> None:
        self._limiter = limiter
        self._frame_px = frame_px

    async def generate(self, request: VariantRequest, *, task_id: str | None, on_submitted: TaskSubmitted) -> bytes:
        async with self._limiter:
            return await asyncio.to_thread(self._render, request.cutout_png, request.spec.key)

    def _render(self, cutout_png: bytes, scene: str) -> bytes:
        return images.encode_png(render_scene(images.decode_rgba(cutout_png), scene, self._frame_px))


def render_marketplace_jpeg(cutout_png: bytes) -> bytes:
    """The marketplace main image (JPEG bytes) from a cut-out PNG: made locally whichever providers ran."""
    return encode_marketplace_jpeg(render_marketplace(images.decode_rgba(cutout_png)))
