"""The local studio: what the service does on this machine when no AI provider is configured.

Cut-out (`cut_out`) separates the piece from the shop's backdrop with no model weights. The backdrop is assumed to
cover the image border and to be smooth or stationary in texture (paper sweeps, card, wood, cloth).

1. Backdrop field. The backdrop's colour everywhere is a quadratic surface fitted to the pixels believed to be
   backdrop, refined by normalised convolution (push-pull), so light falloff and a spot's bright centre are absorbed.
   It is fitted to the lit backdrop only, so shadows are explained as shadows.
2. Evidence. A pixel is the piece if it departs from the field in chroma (after the best uniform darkening), in
   brightness above it (a highlight), or as a darkening too thin to be a shadow (a chain, a prong). Each departure is
   measured against the same departure on the backdrop itself (its 99.9th percentile), so wood grain or a weave
   raises its own bar. Darker with the backdrop's chroma is a shadow or grey metal: a weak vote only.
3. Segmentation. A graph cut (max-flow) at no more than SEGMENT_SIDE_PX combines that evidence with colour mixtures
   learnt from both sides and a contrast-sensitive smoothness term; three rounds re-fit the field and the mixtures.
   Components without a visible outline (a velvet fold, a swell of light) and specks are dropped; regions enclosed
   by the piece are kept as holes (a ring's inside, a chain loop) when wide and smooth like the backdrop, and filled
   when thin or busy (a clear stone's facets). A dim region with the backdrop's chroma is a shadow or grey metal
   alike, so the cut is made under two hypotheses (colour may say "piece" there, or only "backdrop") and the one
   whose result the image supports better (its confidence, below) is kept.
4. Matte and defringe. In a band around the labels' edge alpha solves I = aF + (1 - a)B per pixel of the full image,
   with B the local backdrop colour and F the best of a few local piece colours; a guided filter of the labels takes
   over where F and B are too alike. Colours there are unmixed from B, so no fringe of the old backdrop remains.
5. Confidence. From the segmentation: stable labels, evidence that agrees with them along the boundary, a plausible
   size and framing, few fragments, a piece thick enough for a pixel of rim error not to matter, and above all an
   outline that is an edge all round with no edges running on outside the cut (which is what a missed mirror-like
   part of the piece, or a shadow taken in, leaves behind).

Everything here is a pure function of its input: deterministic, no state, safe to run in several threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

ByteImage = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]
BoolImage = npt.NDArray[np.bool_]

# Sizes
SEGMENT_SIDE_PX = 512  # the segmentation runs at no more than this (longer side)
MATTE_SIDE_PX = 1024  # backdrop and piece colours for the matte are estimated at no more than this
BORDER_SHARE = 0.03  # the band along the image border taken as backdrop to start from
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
GRAPH_MARGIN = 3.0  # nats: pixels this sure of being backdrop, and not next to any less sure, stay out of the graph
OUTLINE_QUANTILE = 0.99  # a steep edge is steeper than this share of the backdrop's gradients
OUTLINE_SHARE = 0.2  # a component of the piece needs this share of its rim on steep edges
OUTLINE_REACH = 0.04  # edges this far (share of the image side) from the piece may close its outline
HOLE_MIN_RADIUS = 0.025  # enclosed regions narrower than this share of the image side are part of the piece...
HOLE_MAX_BUSY = 0.1  # ...and so are those with more steep pixels than this share
SPECK_SHARE = 2e-5  # components smaller than this share of the image are dropped...
SPECK_RELATIVE = 0.002  # ...and those smaller than this share of the largest component

# Confidence
EDGE_SIGMA = 1.5  # px at the segmentation size: smoothing before outline edges are traced (noise makes none)
EDGE_STEP = 2.0  # Lab units: the least step in colour that counts as an outline edge, however clean the backdrop
RIM_ERROR_PX = 1.0  # px at the segmentation size: how far the labels' edge typically sits from the true outline
UNEXPLAINED_WEIGHT = 2.0  # confidence falls by 1/e per half a rim length of outline edges left outside the cut
CANNY_HIGH = 100.0  # Canny's high threshold on the rescaled derivatives (the low one, for hysteresis, is half)

# Matte
MATTE_CONTRAST = 12.0  # RGB distance between piece and backdrop colours below which the matting equation is unstable
MATTE_OFF_LINE = 0.3  # distance off the backdrop-piece line, as a share of its length, at which trust drops to 1/e
MATTE_FG_POWERS = (1.0, 4.0)  # local piece colours weighted by (unlikeness to the backdrop) ** power
SOLID_MATTE = 3.0  # parts at least this many band widths thick keep their labels' alpha a little way in...
MATTE_LABEL_MARGIN = 0.5  # ...where the guided-filtered labels exceed this


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
    rgba = np.dstack([colour, alpha])
    return Cutout(rgba=np.ascontiguousarray(rgba), confidence=segmentation.confidence)


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
        for k in range(self.weights.size):
            whiten = np.linalg.cholesky(self.precisions[k]).astype(np.float32)  # precision = whiten @ whiten.T
            d = (flat - self.means[k].astype(np.float32)) @ whiten
            offset = np.float32(-self.log_norms[k] - np.log(self.weights[k]))
            np.minimum(best, 0.5 * np.einsum("ni,ni->n", d, d) + offset, out=best)
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
        labels = np.argmin(((data[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        means = np.array([data[labels == j].mean(0) if np.any(labels == j) else means[j] for j in range(k)])
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
    ys, xs = np.nonzero(background)
    step = max(1, ys.size // 8000)
    ys, xs = ys[::step], xs[::step]

    def design(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    ny, nx = ys * 2.0 / h - 1, xs * 2.0 / w - 1
    a = design(ny, nx)
    values = lab[ys, xs].astype(np.float64)
    weights = np.ones(ys.size)
    for _ in range(3):  # reweighted: texture and stray pixels pull less
        sw = np.sqrt(weights)[:, None]
        coef = np.linalg.lstsq(a * sw, values * sw, rcond=None)[0]
        error = np.linalg.norm(values - a @ coef, axis=1)
        weights = 1.0 / np.maximum(1.0, error / max(1e-3, float(np.median(error))))
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    grid = design(gy * 2.0 / h - 1, gx * 2.0 / w - 1)
    return (grid @ coef).astype(np.float32)


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
    """Per-pixel dot product of colour vectors (sum over the last axis), much faster than (a * b).sum(-1)."""
    return as_float(np.einsum("...i,...i->...", a, b))


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


def border_band(shape: tuple[int, int]) -> BoolImage:
    h, w = shape
    b = max(2, round(BORDER_SHARE * min(h, w)))
    band = np.zeros(shape, bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    return band


def robust_spread(values: npt.NDArray[np.float32], floor: float) -> tuple[float, float]:
    centre = float(np.median(values))
    return centre, max(floor, float(np.median(np.abs(values - centre))) * 1.4826)


def field_evidence(lab: FloatImage, field: FloatImage, reference: BoolImage) -> tuple[FloatImage, BoolImage]:
    """Log-likelihood ratio (nats, > 0 favours the piece) from how each pixel departs from the backdrop field.

    Three departures are evidence of the piece: a different chroma (after the best uniform darkening), brighter than
    the backdrop (a highlight), and darker in a structure too thin to be a shadow (a chain, a prong, an outline).
    Each is calibrated on the backdrop itself: its value at the backdrop's BACKDROP_QUANTILE is the threshold, so a
    textured backdrop (grain lines, weave) raises its own bar. Darker with the backdrop's chroma is what a shadow
    looks like, and also what grey metal looks like: that gets only a weak vote, growing with depth, and the
    contrast term decides.

    Also returns which pixels look like a shadow: darker than the lit backdrop, by no more than the deepest shadow
    explained."""
    v = lab + np.array([16.0, 0, 0], np.float32)
    f = field + np.array([16.0, 0, 0], np.float32)
    level = dot(v, f) / np.maximum(dot(f, f), 1e-6)
    across = (v - level[..., None] * f).astype(np.float32)
    sample = across[reference]
    if sample.shape[0] > 20000:
        sample = sample[:: sample.shape[0] // 20000 + 1]
    precision = np.linalg.inv(np.cov(sample.T.astype(np.float64)) + np.eye(3) * CHROMA_NOISE_FLOOR**2)
    whiten = np.linalg.cholesky(precision).astype(np.float32)
    whitened = across @ whiten
    chroma = np.sqrt(dot(whitened, whitened))
    if SHADOW_SATURATION > 0:
        # In shadow a coloured backdrop is lit by light it reflected itself: darker and more saturated. Fit lightness
        # and chroma scales separately; within the allowed boost the remaining departure is what counts.
        f_light = f * np.array([1.0, 0, 0], np.float32)
        f_chroma = f * np.array([0, 1.0, 1.0], np.float32)
        light = dot(v, f_light) / np.maximum(dot(f_light, f_light), 1e-6)
        tone = dot(v, f_chroma) / np.maximum(dot(f_chroma, f_chroma), 1e-6)
        tone = np.clip(tone, light, light * (1 + SHADOW_SATURATION * np.clip(1 - light, 0, 1) / (1 - SHADOW_MIN_SCALE)))
        boosted = (v - light[..., None] * f_light - tone[..., None] * f_chroma) @ whiten
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
    return unary, as_bool(darker & (brightness - lit > darkest))


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
    """
    lab = to_lab(as_bytes(cv2.GaussianBlur(small, (0, 0), 0.8)))
    border = border_band(lab.shape[:2])
    pairwise = contrast_weights(lab)
    outline = outline_edges(lab, border)
    # First guess: what departs from a coarse field predicted from the border alone, kept only where it has a
    # visible outline (a fold in velvet or a swell of light departs too, but softly).
    field = backdrop_field(lab, border, finest=1 / 8)
    seeds = outlined(field_evidence(lab, field, border)[0] > SEED_EVIDENCE, steep_edges(lab, border))
    background = ~cv2.dilate(seeds.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    first = learn(lab, background, None)
    if first is None:
        return Segmentation(np.zeros(lab.shape[:2], bool), lit_field(lab, background), 0.0)
    hypotheses = [cut(lab, background, first, pairwise, outline, strict=strict) for strict in (False, True)]
    return max(hypotheses, key=lambda segmentation: segmentation.confidence)


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
    unary, shadow_like = field_evidence(lab, field, background)
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
    lab: FloatImage, background: BoolImage, first: Model, pairwise: Pairwise, outline: BoolImage, *, strict: bool
) -> Segmentation:
    """CUT_ROUNDS rounds of: graph cut on the field evidence plus the colour mixtures' vote, outline closure, then
    the field, evidence and mixtures learnt again from the new labels. `first` is the first round's model (the same
    for both hypotheses); `strict` is the hypothesis described in `segment`."""
    shape = lab.shape[:2]
    border = border_band(shape)
    foreground = previous = np.zeros(shape, bool)
    model: Model | None = first
    unary = first.unary
    for round_ in range(CUT_ROUNDS):
        if round_:
            model = learn(lab, background, foreground)
        if model is None:
            return Segmentation(np.zeros(shape, bool), first.field, 0.0)
        quiet = model.shadow_like if strict else np.zeros(shape, bool)
        unary = model.unary + colour_term(lab, model.unary, model.backdrop_colours, model.piece_colours, quiet)
        unary[border & (unary < 0)] = -1e3
        previous = foreground
        steep = steep_edges(lab, background)
        foreground = outlined(drop_specks(graph_cut(unary, pairwise)), steep)
        foreground = close_outline(foreground, steep, outline if strict else None)
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
    size = float(np.clip((area - 2e-4) / 1e-3, 0, 1) * np.clip((0.6 - area) / 0.25, 0, 1))
    stats = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)[2]
    areas = stats[1:, cv2.CC_STAT_AREA]
    dust = float(areas[areas < 0.01 * areas.sum()].sum() / max(1, areas.sum()))
    fragments = float(np.clip(1.0 - 10.0 * dust, 0.0, 1.0))
    labels = foreground.astype(np.uint8)
    rim_length = max(1.0, np.count_nonzero(cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))) / 2)
    half_width = np.count_nonzero(foreground) / rim_length  # a band w wide and L long: area w L, rim 2 L
    precision = float(np.clip(1.0 - RIM_ERROR_PX / half_width, 0.0, 1.0))
    near = cv2.dilate(labels, np.ones((5, 5), np.uint8)).astype(bool)
    count, pieces = cv2.connectedComponents(edges.astype(np.uint8), connectivity=8)
    attached = np.zeros(count, bool)
    attached[pieces[near & edges]] = True
    attached[0] = False
    unexplained = np.count_nonzero(attached[pieces] & ~near) / rim_length
    explained = float(np.exp(-UNEXPLAINED_WEIGHT * unexplained))
    quality = stability**2 * clarity * framing * size * fragments * precision * explained
    return float(np.clip(quality, 0.0, 1.0))


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


def steep_edges(lab: FloatImage, reference: BoolImage) -> BoolImage:
    """Pixels whose gradient is steeper than nearly all of the backdrop's own."""
    gx = as_float(cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3))
    gy = as_float(cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3))
    steepness = np.sqrt(dot(gx, gx) + dot(gy, gy))
    return as_bool(steepness > np.quantile(steepness[reference], OUTLINE_QUANTILE))


def close_outline(foreground: BoolImage, steep: BoolImage, outline: BoolImage | None) -> BoolImage:
    """Fill what the piece's outline encloses, except true holes.

    Polished metal can mirror the backdrop so exactly that only its outline shows: steep edges connected to the piece
    close such regions. An enclosed region stays background (the inside of a ring, a chain loop) if it is wide and
    as smooth as the backdrop; a thin sliver between outlines, or a busy region (the facets of a clear stone), is
    filled."""
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
    count, labels = cv2.connectedComponents((~closed).astype(np.uint8), connectivity=4)
    outside = np.zeros(count, bool)
    outside[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    depth = cv2.distanceTransform((~closed).astype(np.uint8), cv2.DIST_L2, 3)
    widest = np.zeros(count, np.float32)
    np.maximum.at(widest, labels.ravel(), depth.ravel())
    inner = depth > 2.0  # the enclosing edges bleed a pixel or two into the region
    size = np.bincount(labels[inner], minlength=count).astype(np.float64)
    busy = np.bincount(labels[inner], weights=steep[inner], minlength=count) / np.maximum(size, 1)
    fill = ~outside & ((widest < HOLE_MIN_RADIUS * side) | (busy > HOLE_MAX_BUSY))
    fill[0] = False
    filled = fill[labels] & ~closed
    seam = attached & cv2.dilate(filled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return as_bool(foreground | filled | seam)


def outlined(candidates: BoolImage, steep: BoolImage) -> BoolImage:
    """The candidate regions whose outline is an edge: at least a share of their boundary is steep."""
    grown = cv2.dilate(candidates.astype(np.uint8), np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    rim = (cv2.morphologyEx(grown, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0) & (labels > 0)
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

    Only pixels near anything that could be foreground enter the graph; the rest are background, and a graph pixel's
    links to them become part of its cost of being foreground. The graph is built directly in CSR form: each pixel
    row lists its up, left, right and down neighbours and the sink, in that (ascending) order; the source row lists
    every pixel."""
    h, w = unary.shape
    candidate = (unary > -GRAPH_MARGIN).astype(np.uint8)
    active = cv2.dilate(candidate, np.ones((5, 5), np.uint8)).astype(bool)
    n = int(np.count_nonzero(active))
    if n == 0:
        return np.zeros((h, w), bool)
    index = np.full((h + 2, w + 2), -1, np.int64)  # padded: neighbours off the image are "inactive"
    index[1:-1, 1:-1][active] = np.arange(n)
    right = np.zeros((h, w), np.float32)
    right[:, :-1] = pairwise.right
    down = np.zeros((h, w), np.float32)
    down[:-1] = pairwise.down
    left = np.zeros((h, w), np.float32)
    left[:, 1:] = pairwise.right
    up = np.zeros((h, w), np.float32)
    up[1:] = pairwise.down
    neighbours = [index[:-2, 1:-1], index[1:-1, :-2], index[1:-1, 2:], index[2:, 1:-1]]  # up, left, right, down
    weights = [up, left, right, down]
    to_sink = np.maximum(-unary, 0)
    for neighbour, weight in zip(neighbours, weights, strict=True):
        to_sink = to_sink + np.where(neighbour < 0, weight, 0)  # a fixed background neighbour
    source, sink = n, n + 1
    columns = np.stack([nb[active] for nb in neighbours] + [np.full(n, sink)], axis=1)
    capacities = np.stack([wt[active] for wt in weights] + [to_sink[active]], axis=1)
    capacities = np.round(capacities * CAPACITY_SCALE).astype(np.int32)
    valid = (columns >= 0) & (capacities > 0)
    indptr = np.zeros(n + 3, np.int64)
    indptr[1 : n + 1] = np.cumsum(valid.sum(1))
    indptr[n + 1] = indptr[n] + n
    indptr[n + 2] = indptr[n + 1]
    to_source = np.round(np.maximum(unary[active], 0) * CAPACITY_SCALE).astype(np.int32)
    indices = np.concatenate([columns[valid], np.arange(n)]).astype(np.int32)
    data = np.concatenate([capacities[valid], to_source]).astype(np.int32)
    graph = csr_matrix((data, indices, indptr), shape=(n + 2, n + 2))
    flow = maximum_flow(graph, source, sink).flow
    residual = (graph - flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    labels = np.zeros(n + 2, bool)
    labels[reached] = True
    result = np.zeros((h, w), bool)
    result[active] = labels[:n]
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
    matting equation I = a F + (1 - a) B with B the local backdrop colour (from sure-background pixels nearby) and F
    the local piece colour (from the pixels least like the backdrop nearby, so a chain thinner than the band still
    has one). Where F and B are too alike for that to be stable, a guided filter of the labels takes over.
    B, F and the fallback are smooth, so they are estimated at no more than MATTE_SIDE_PX and interpolated; the
    equation itself is solved at every band pixel of the full image."""
    height, width = rgb.shape[:2]
    scale = min(1.0, MATTE_SIDE_PX / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    image = work.astype(np.float32)
    small_h, small_w = segmentation.foreground.shape
    upscale = max(size[1] / small_h, size[0] / small_w)
    labels = cv2.resize(segmentation.foreground.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    reach = int(np.ceil(upscale)) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    sure_fg = cv2.erode(labels, kernel).astype(np.float32)
    # Where the piece is wide, its labels are trusted a little way in from their edge: polished metal can match the
    # backdrop's colour right up to an outline the colours alone cannot place. Thin parts (a chain) are matted
    # throughout: labels a few pixels wide are too coarse for that.
    thickness = cv2.dilate(cv2.distanceTransform(labels, cv2.DIST_L2, 3), kernel)
    solid = (cv2.dilate(thickness, kernel) > SOLID_MATTE * reach).astype(np.float32)
    sure_bg = cv2.erode(1 - labels, kernel).astype(np.float32)
    unknown = (1 - sure_fg) * (1 - sure_bg)

    sigma = 1.5 * reach
    backdrop, bg_mass = local_mean(image, sure_bg, sigma)
    field_rgb = as_float(cv2.cvtColor(segmentation.backdrop_lab, cv2.COLOR_LAB2RGB)) * 255.0
    field_rgb = as_float(cv2.resize(field_rgb, size, interpolation=cv2.INTER_LINEAR))
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
    grey = image.mean(-1) / 255.0
    soft = np.clip(guided_filter_grey(grey, labels.astype(np.float32), reach, 1e-3), 0, 1)
    floor = solid * np.clip(soft - MATTE_LABEL_MARGIN, 0, 1) / max(1e-3, 1 - MATTE_LABEL_MARGIN)

    if scale < 1:
        full = (width, height)
        backdrop, soft, floor, sure_fg, unknown = (
            as_float(cv2.resize(x, full, interpolation=cv2.INTER_LINEAR))
            for x in (backdrop, soft, floor, sure_fg, unknown)
        )
        candidates = [as_float(cv2.resize(c, full, interpolation=cv2.INTER_LINEAR)) for c in candidates]
    alpha = np.clip(sure_fg, 0, 1)
    colour = rgb.copy()
    band = unknown > 0
    at = rgb[band].astype(np.float32)
    b = backdrop[band]
    # Metal is shaded: of a few estimates of the local piece colour (from the mean of the piece's pixels to the
    # ones least like the backdrop), each pixel takes the one that explains it best.
    best_error = np.full(b.shape[0], np.inf, np.float32)
    f = candidates[0][band]
    solved = np.zeros(b.shape[0], np.float32)
    for candidate in candidates:
        c = candidate[band]
        c_span = c - b
        c_span2 = np.maximum(dot(c_span, c_span), 1e-3)
        c_alpha = np.clip(dot(at - b, c_span) / c_span2, 0, 1)
        error = length(at - b - c_alpha[:, None] * c_span) / np.sqrt(c_span2)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        solved = np.where(better, c_alpha, solved)
        f = np.where(better[:, None], c, f)
    span = f - b
    span2 = dot(span, span)
    reliable = span2 / (span2 + MATTE_CONTRAST**2)
    # A pixel far off the line between backdrop and piece colour (a highlight on metal shaded unlike its
    # neighbours) is not explained by this pair: trust the labels there instead.
    off_line = length(at - b - solved[:, None] * span)
    reliable *= np.exp(-((off_line / (MATTE_OFF_LINE * np.sqrt(span2) + MATTE_CONTRAST)) ** 2))
    a = np.maximum(reliable * solved + (1 - reliable) * soft[band], floor[band])
    weight = unknown[band]
    a = weight * a + (1 - weight) * alpha[band]
    alpha[band] = a
    # Defringe: unmix the backdrop where alpha is large enough to divide by, the local piece colour elsewhere.
    unmixed = b + (at - b) / np.maximum(a, 0.05)[:, None]
    trust = np.clip((a - 0.15) / 0.5, 0, 1)[:, None]
    colour[band] = np.clip(trust * unmixed + (1 - trust) * f, 0, 255).round().astype(np.uint8)
    return (alpha * 255).round().astype(np.uint8), colour


def guided_filter_grey(guide: FloatImage, src: FloatImage, radius: int, eps: float) -> FloatImage:
    """He et al.'s guided filter with a grey guide."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: FloatImage) -> FloatImage:
        return as_float(cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT))

    mean_i, mean_p = box(guide), box(src)
    a = (box(as_float(guide * src)) - mean_i * mean_p) / (box(as_float(guide * guide)) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return box(as_float(a)) * guide + box(as_float(b))
