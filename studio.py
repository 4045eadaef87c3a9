"""The local studio: what the service does on this machine when no AI provider is configured.

Cut-out (`cut_out`): the piece is separated from the shop's backdrop with no model weights, in four steps, all at
reduced resolution except the matte itself:

1. Background model. The backdrop covers the image border; its colour field is interpolated inward from the pixels
   currently believed to be background (normalised convolution, coarse to fine), so light falloff is absorbed. A pixel
   is background-like if it matches that field, or the field darkened uniformly (a shadow keeps the backdrop's
   chroma), or the backdrop's global colour mixture (texture: wood grain, weave, marble veins).
2. Segmentation. A graph cut (max-flow) labels each pixel from the background model against a colour mixture learnt
   from the piece, with contrast-sensitive smoothness normalised by the backdrop's own texture; the labels are
   re-estimated twice. Regions enclosed by the piece (the inside of a ring, a chain loop) are labelled on their own
   evidence, so background seen through them is removed.
3. Matte. Around the boundary, alpha comes from the matting equation against the local backdrop and piece colours
   where they differ, and from a guided filter of the labels where they don't; the result is soft, not a threshold.
4. Defringe. Colours at partially transparent pixels are unmixed from the estimated backdrop, so no halo of the old
   backdrop remains.

Everything here is a pure function of its input: deterministic, no state, safe to run in several threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

ByteImage = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]
BoolImage = npt.NDArray[np.bool_]

SEGMENT_SIDE_PX = 512  # the graph cut runs at this size (longer side)
BORDER_SHARE = 0.03  # the band along the image border taken as backdrop to start from
SHADOW_MIN_SCALE = 0.55  # Lab scale of the darkest shadow the model explains (about 18 % of the light)
SHADOW_BIAS = -1.5  # nats: a shallow shadow-like darkening is slightly more likely backdrop...
SHADOW_DEPTH_GAIN = 8.0  # ...and a deep one slightly more likely metal; contrast decides (nats per unit depth)
LIT_WEIGHT = 4.0  # nats for a pixel that matches the lit backdrop within its noise
EVIDENCE_THRESHOLD = 3.0  # departures beyond this many noise units are evidence of the piece
BACKDROP_QUANTILE = 0.999  # the share of the backdrop that sits within the threshold
CHROMA_NOISE_FLOOR = 0.4  # Lab units
LEVEL_NOISE_FLOOR = 0.01  # log brightness
CHROMA_FLOOR = 1.5  # Lab units: the least chroma departure that counts as the piece, however clean the backdrop
SHADOW_TINT = 10.0  # Lab units of extra chroma tolerance per unit of shadow depth (light bounced off the piece)
LEVEL_FLOOR = 0.02  # log brightness: the least brightening that counts
THIN_FLOOR = 0.05  # log brightness: the least thin darkening that counts
SEED_EVIDENCE = 4.0  # nats of field evidence that make a pixel a sure sample of the piece's colours
MATTE_CONTRAST = 12.0  # RGB distance between piece and backdrop colours below which the matting equation is unstable
SPECK_SHARE = 2e-5  # foreground components smaller than this share of the image are dropped
COLOUR_CAP = 3.0  # nats the learnt colour mixtures can add for either side
SHADOW_MIN_WIDTH = 0.012  # darkening narrower than this share of the image side is not a shadow
TEXTURE_CAP = 0.0  # nats the local gradient energy can add for either side
GMM_COMPONENTS = 5
SMOOTHNESS = 2.0  # weight of the contrast-sensitive pairwise term, in nats per neighbour pair
UNARY_CAP = 12.0  # nats; keeps one odd pixel from outvoting its neighbourhood
CUT_ROUNDS = 3
CAPACITY_SCALE = 64  # max-flow works on integers


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
    small = cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
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

    def cost(self, lab: FloatImage) -> FloatImage:
        """-log density per pixel (nats), H×W."""
        flat = lab.reshape(-1, 3).astype(np.float64)
        best = np.full(flat.shape[0], np.inf)
        for k in range(self.weights.size):
            d = flat - self.means[k]
            maha = np.einsum("ni,ij,nj->n", d, self.precisions[k], d)
            best = np.minimum(best, 0.5 * maha - self.log_norms[k] - np.log(self.weights[k]))
        return best.reshape(lab.shape[:2]).astype(np.float32)


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
    return v.reshape(values.shape), m


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


def backdrop_field(lab: FloatImage, background: BoolImage, finest: float = 1 / 96) -> FloatImage:
    """The backdrop's colour everywhere: a quadratic surface, refined by interpolating the background pixels'
    departures from it, wide blurs first, finer ones where there is enough background nearby (push-pull)."""
    base = polynomial_field(lab, background)
    departure = lab - base
    weights = background.astype(np.float32)
    side = max(lab.shape[:2])
    field = np.zeros_like(lab)
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


def to_lab(rgb: ByteImage) -> FloatImage:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def border_band(shape: tuple[int, int]) -> BoolImage:
    h, w = shape
    b = max(2, round(BORDER_SHARE * min(h, w)))
    band = np.zeros(shape, bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    return band


def robust_spread(values: npt.NDArray[np.float32], floor: float) -> tuple[float, float]:
    centre = float(np.median(values))
    return centre, max(floor, float(np.median(np.abs(values - centre))) * 1.4826)


def field_evidence(lab: FloatImage, field: FloatImage, background: BoolImage, reference: BoolImage) -> FloatImage:
    """Log-likelihood ratio (nats, > 0 favours the piece) from how each pixel departs from the backdrop field.

    Three departures are evidence of the piece: a different chroma (after the best uniform darkening), brighter than
    the backdrop (a highlight), and darker in a structure too thin to be a shadow (a chain, a prong, an outline).
    Each is calibrated on the backdrop itself: its value at the backdrop's 99.5th percentile is the threshold, so a
    textured backdrop (grain lines, weave) raises its own bar. Darker with the backdrop's chroma is what a shadow
    looks like, and also what grey metal looks like: that gets only a weak vote, growing with depth, and the
    contrast term decides."""
    v = lab + np.array([16.0, 0, 0], np.float32)
    f = field + np.array([16.0, 0, 0], np.float32)
    level = (v * f).sum(-1) / np.maximum((f * f).sum(-1), 1e-6)
    across = (v - level[..., None] * f).astype(np.float32)
    sample = across[reference]
    if sample.shape[0] > 20000:
        sample = sample[:: sample.shape[0] // 20000 + 1]
    precision = np.linalg.inv(np.cov(sample.T.astype(np.float64)) + np.eye(3) * CHROMA_NOISE_FLOOR**2)
    chroma = np.sqrt(np.einsum("...i,ij,...j->...", across, precision.astype(np.float32), across))

    brightness = np.log(np.maximum(level, 1e-3)).astype(np.float32)
    lit, lit_spread = robust_spread(brightness[reference], LEVEL_NOISE_FLOOR)
    above = np.maximum(brightness - lit, 0)

    darkest = np.log(SHADOW_MIN_SCALE)
    clamped = np.clip(brightness - lit, darkest, 0).astype(np.float32)
    reach = max(3, round(SHADOW_MIN_WIDTH * max(lab.shape[:2]))) | 1
    closed = cv2.morphologyEx(clamped, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach)))
    thin = closed - clamped

    # Shadows on a real set pick up the colour of light bounced off the piece: the deeper, the more tint allowed.
    depth = 1.0 - np.exp(closed)  # 0 lit .. about 0.45 at the deepest shadow explained (Lab scale)
    chroma = chroma / (1.0 + depth * (SHADOW_TINT / CHROMA_FLOOR))
    z = np.zeros_like(chroma)
    for channel, floor in ((chroma, CHROMA_FLOOR), (above, LEVEL_FLOOR), (thin, THIN_FLOOR)):
        bar = max(floor, float(np.quantile(channel[reference], BACKDROP_QUANTILE)))
        z = np.maximum(z, channel * (EVIDENCE_THRESHOLD / bar))
    piece = 0.5 * (z * z - EVIDENCE_THRESHOLD**2)
    darker = brightness - lit < -EVIDENCE_THRESHOLD * lit_spread
    shadowed = np.where(darker, np.clip(SHADOW_BIAS + SHADOW_DEPTH_GAIN * depth, -2.0, 2.0), -LIT_WEIGHT)
    return np.where(piece > 0, np.minimum(piece, UNARY_CAP), np.maximum(piece, shadowed)).astype(np.float32)


def shadowed_samples(lab: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Backdrop colours as they would look in shadow too (Lab scale of L+16, a, b from 1 down to the deepest
    shadow), so a colour model of the backdrop doesn't take its own shadows for the piece."""
    scales = np.linspace(1.0, SHADOW_MIN_SCALE, 4, dtype=np.float32)
    offset = np.array([16.0, 0, 0], np.float32)
    every = lab[:: max(1, lab.shape[0] // 4000)]
    return np.concatenate([(every + offset) * k - offset for k in scales])


def texture_energy(lab: FloatImage) -> FloatImage:
    """log of the local gradient energy: cut stones and engraving are busier than most backdrops."""
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    energy = (gx * gx + gy * gy) @ np.array([1.0, 0.5, 0.5], np.float32)
    return np.log(cv2.GaussianBlur(energy, (0, 0), 1.5) + 1.0)


def normal_llr(values: FloatImage, background: BoolImage, foreground: BoolImage, cap: float) -> FloatImage:
    """log p(value | piece) - log p(value | backdrop), each a robust normal fit, clipped to `cap` nats."""
    mb, sb = robust_spread(values[background], 0.25)
    mf, sf = robust_spread(values[foreground], 0.25)
    llr = -0.5 * ((values - mf) / sf) ** 2 - np.log(sf) + 0.5 * ((values - mb) / sb) ** 2 + np.log(sb)
    return np.clip(llr, -cap, cap).astype(np.float32)


def segment(small: ByteImage) -> Segmentation:
    blurred = cv2.GaussianBlur(small, (0, 0), 0.8)
    lab = to_lab(blurred)
    shape = lab.shape[:2]
    border = border_band(shape)
    background = border
    pairwise = contrast_weights(lab, border)
    energy = texture_energy(lab)
    foreground = np.zeros(shape, bool)
    field = lab
    # First guess at the backdrop: everything but clear outliers, so the field can follow folds and falloff that
    # the border alone can't predict; calibrated on the border, which the piece rarely reaches.
    background = np.ones(shape, bool)
    for _ in range(2):
        field = backdrop_field(lab, background, finest=1 / 32)
        evidence = field_evidence(lab, field, background, border)
        background = ~cv2.dilate((evidence > SEED_EVIDENCE).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    for round_ in range(CUT_ROUNDS):
        field = backdrop_field(lab, background)
        unary = field_evidence(lab, field, background, background)
        seeds = unary > SEED_EVIDENCE
        if np.count_nonzero(seeds) < 10:
            return Segmentation(np.zeros(shape, bool), field, 0.0)
        known = foreground if round_ else seeds
        bg_colours = fit_mixture(shadowed_samples(lab[background]), GMM_COMPONENTS, floor=1.0)
        fg_colours = fit_mixture(lab[known], GMM_COMPONENTS, floor=1.5)
        unary += np.clip(bg_colours.cost(lab) - fg_colours.cost(lab), -COLOUR_CAP, COLOUR_CAP)
        unary += normal_llr(energy, background, known, TEXTURE_CAP)
        unary[border & (unary < 0)] = -1e3
        foreground = drop_specks(graph_cut(unary, pairwise))
        background = ~cv2.dilate(foreground.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return Segmentation(foreground, field, confidence=0.5)


def drop_specks(mask: BoolImage) -> BoolImage:
    """Remove foreground components too small to be part of a piece (noise, dust, a stray texture blob)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    smallest = max(6, round(SPECK_SHARE * mask.size))
    keep = stats[:, cv2.CC_STAT_AREA] >= smallest
    keep[0] = False
    return keep[labels]


@dataclass(frozen=True)
class Pairwise:
    right: FloatImage  # weight between (y, x) and (y, x+1), H×(W-1)
    down: FloatImage  # weight between (y, x) and (y+1, x), (H-1)×W


def contrast_weights(lab: FloatImage, reference: BoolImage) -> Pairwise:
    """Contrast-sensitive smoothness: neighbours that differ little relative to the backdrop's own texture are
    expensive to separate."""
    dx = ((lab[:, 1:] - lab[:, :-1]) ** 2).sum(-1)
    dy = ((lab[1:] - lab[:-1]) ** 2).sum(-1)
    typical = float(np.mean(np.concatenate([dx[reference[:, 1:]], dy[reference[1:]]]))) + 1e-3
    beta = 1.0 / (2.0 * typical)
    return Pairwise(SMOOTHNESS * np.exp(-beta * dx), SMOOTHNESS * np.exp(-beta * dy))


def graph_cut(unary: FloatImage, pairwise: Pairwise) -> BoolImage:
    """Minimum cut: True where labelling foreground is cheaper. `unary` > 0 favours foreground."""
    h, w = unary.shape
    n = h * w
    source, sink = n, n + 1
    index = np.arange(n).reshape(h, w)
    right = np.round(pairwise.right * CAPACITY_SCALE).astype(np.int32).ravel()
    down = np.round(pairwise.down * CAPACITY_SCALE).astype(np.int32).ravel()
    to_source = np.round(np.maximum(unary, 0) * CAPACITY_SCALE).astype(np.int32).ravel()
    to_sink = np.round(np.maximum(-unary, 0) * CAPACITY_SCALE).astype(np.int32).ravel()
    a_r, b_r = index[:, :-1].ravel(), index[:, 1:].ravel()
    a_d, b_d = index[:-1].ravel(), index[1:].ravel()
    all_nodes = index.ravel()
    rows = np.concatenate([a_r, b_r, a_d, b_d, np.full(n, source), all_nodes])
    cols = np.concatenate([b_r, a_r, b_d, a_d, all_nodes, np.full(n, sink)])
    caps = np.concatenate([right, right, down, down, to_source, to_sink])
    keep = caps > 0
    graph = csr_matrix((caps[keep], (rows[keep], cols[keep])), shape=(n + 2, n + 2))
    flow = maximum_flow(graph, source, sink).flow
    residual = (graph - flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    labels = np.zeros(n + 2, bool)
    labels[reached] = True
    return labels[:n].reshape(h, w)


# ---------------------------------------------------------------------------------------------------------------
# Matte and defringe


def local_mean(rgb: FloatImage, weights: FloatImage, sigma: float) -> tuple[FloatImage, FloatImage]:
    """Weighted local mean colour and the local weight mass."""
    num = cv2.GaussianBlur(rgb * weights[..., None], (0, 0), sigma)
    den = cv2.GaussianBlur(weights, (0, 0), sigma)
    return num / np.maximum(den, 1e-6)[..., None], den


def matte(rgb: ByteImage, segmentation: Segmentation) -> tuple[ByteImage, ByteImage]:
    """Alpha and defringed colour at full size from the segmentation's labels.

    In a band around the label boundary (as wide as the segmentation's pixels, plus a margin), alpha solves the
    matting equation I = a F + (1 - a) B with B the local backdrop colour (from sure-background pixels nearby) and F
    the local piece colour (sure-foreground pixels, or in a thin chain the band pixels least like the backdrop).
    Where F and B are too alike for that to be stable, a guided filter of the labels takes over."""
    height, width = rgb.shape[:2]
    small_h, small_w = segmentation.foreground.shape
    upscale = max(height / small_h, width / small_w)
    image = rgb.astype(np.float32)
    labels = cv2.resize(segmentation.foreground.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    reach = int(np.ceil(upscale)) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    sure_fg = cv2.erode(labels, kernel).astype(np.float32)
    sure_bg = cv2.erode(1 - labels, kernel).astype(np.float32)
    unknown = (1 - sure_fg) * (1 - sure_bg)

    sigma = 1.5 * reach
    backdrop, bg_mass = local_mean(image, sure_bg, sigma)
    far_backdrop, _ = local_mean(image, sure_bg, 6 * sigma)
    near = np.clip(bg_mass / 0.05, 0, 1)[..., None]
    backdrop = near * backdrop + (1 - near) * far_backdrop

    # In a chain thinner than the band there is no sure foreground: the pixels least like the backdrop stand in.
    difference = np.linalg.norm(image - backdrop, axis=-1)
    unlike = unknown * (difference / (difference.max() + 1e-3)) ** 6
    piece, _ = local_mean(image, sure_fg + unlike, sigma)

    span = piece - backdrop
    span2 = (span * span).sum(-1)
    solved = np.clip(((image - backdrop) * span).sum(-1) / np.maximum(span2, 1e-3), 0, 1)
    reliable = span2 / (span2 + MATTE_CONTRAST**2)
    soft = np.clip(guided_filter(image / 255.0, labels.astype(np.float32), radius=reach, eps=1e-3), 0, 1)
    alpha = sure_fg + unknown * (reliable * solved + (1 - reliable) * soft)

    # Defringe: unmix the backdrop where alpha is large enough to divide by, the local piece colour elsewhere.
    unmixed = backdrop + (image - backdrop) / np.maximum(alpha, 0.05)[..., None]
    trust = np.clip((alpha - 0.15) / 0.5, 0, 1)[..., None]
    colour = np.where(unknown[..., None] > 0, trust * unmixed + (1 - trust) * piece, image)
    return (alpha * 255).round().astype(np.uint8), np.clip(colour, 0, 255).round().astype(np.uint8)


def guided_filter(guide: FloatImage, src: FloatImage, radius: int, eps: float) -> FloatImage:
    """He et al.'s guided filter with a colour guide."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: FloatImage) -> FloatImage:
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_i = box(guide)
    mean_p = box(src)
    mean_ip = box(guide * src[..., None])
    cov_ip = mean_ip - mean_i * mean_p[..., None]
    var = np.empty(guide.shape[:2] + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            v = box(guide[..., i] * guide[..., j]) - mean_i[..., i] * mean_i[..., j]
            var[..., i, j] = v
            var[..., j, i] = v
    var += eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var, cov_ip[..., None])[..., 0]
    b = mean_p - (a * mean_i).sum(-1)
    return (box(a) * guide).sum(-1) + box(b)
