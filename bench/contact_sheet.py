"""Contact sheet of the local studio: for each sample photo, one row of what the service makes from it.

    python bench/contact_sheet.py                       bench/out/contact_sheet.png and docs/contact_sheet.jpg
    python bench/contact_sheet.py --out PATH --thumb PX the full-size sheet elsewhere, or with other thumbnails
    python bench/contact_sheet.py --matte truth         use the samples' exact mattes, not `studio.cut_out`

Columns: the input photo, the cut-out on a checkerboard, the four scenes (rendered at 2048², as shipped) and the
white marketplace image (2000², through the marketplace JPEG encoder). The cut-out comes from `studio.cut_out` when
it imports and runs; otherwise (or with `--matte truth`) from the sample's exact matte. Each row says which.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio import SCENE_KEYS, encode_marketplace_jpeg, render_marketplace, render_scene  # noqa: E402

SAMPLES = REPO.parent / "shared" / "samples"
ByteImage = npt.NDArray[np.uint8]
CutOut = Callable[[ByteImage], tuple[ByteImage, float]]

COLUMNS = ("photo", "cut-out", *SCENE_KEYS, "marketplace")
SCENE_FRAME_PX = 2048
WEB_THUMB_PX = 160
WEB_MAX_BYTES = 400_000


@dataclass(frozen=True)
class Row:
    name: str
    source: str  # where the cut-out came from, for the label
    tiles: list[ByteImage]  # RGB thumbnails, one per column


def load_studio_cut_out() -> CutOut | None:
    try:
        from studio import cut_out
    except ImportError as exc:
        print(f"studio.cut_out not importable ({exc}); using the exact mattes")
        return None

    def run(rgb: ByteImage) -> tuple[ByteImage, float]:
        result = cut_out(rgb)
        return result.rgba, result.confidence

    return run


def read_rgb(path: Path) -> ByteImage:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return np.ascontiguousarray(bgr[..., ::-1])


def cut_out_sample(photo: Path, rgb: ByteImage, studio_cut_out: CutOut | None) -> tuple[ByteImage, str]:
    truth = cv2.imread(str(photo.with_name(photo.name.replace("_photo.jpg", "_alpha.png"))), cv2.IMREAD_GRAYSCALE)
    if studio_cut_out is not None:
        try:
            started = time.perf_counter()
            rgba, confidence = studio_cut_out(rgb)
            elapsed = time.perf_counter() - started
        except Exception as exc:  # a bench shows what it can: fall back to the exact matte and say so
            print(f"  studio.cut_out failed on {photo.name}: {exc!r}; using the exact matte")
        else:
            label = f"studio.cut_out, confidence {confidence:.2f}, {elapsed:.1f} s"
            if truth is not None and truth.shape == rgba.shape[:2]:
                mine, exact = rgba[..., 3] > 127, truth > 127
                label += f", IoU {(mine & exact).sum() / max(1, (mine | exact).sum()):.3f} against the exact matte"
            return rgba, label
    if truth is None:
        raise FileNotFoundError(f"no matte beside {photo}")
    return np.dstack([rgb, truth]), "exact matte (ground truth)"


def thumbnail(image: ByteImage, side_px: int) -> ByteImage:
    height, width = image.shape[:2]
    scale = side_px / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    tile = np.full((side_px, side_px, 3), 255, np.uint8)
    top, left = (side_px - size[1]) // 2, (side_px - size[0]) // 2
    tile[top : top + size[1], left : left + size[0]] = small
    return tile


def on_checkerboard(rgba: ByteImage) -> ByteImage:
    height, width = rgba.shape[:2]
    square = max(8, max(height, width) // 32)
    rows, cols = np.indices((height, width))
    board = np.where(((rows // square + cols // square) % 2 == 0)[..., None], 235, 200).astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    return np.rint(rgba[..., :3] * alpha + board * (1 - alpha)).astype(np.uint8)


def render_row(photo: Path, studio_cut_out: CutOut | None, thumb_px: int) -> tuple[Row, dict[str, float]]:
    rgb = read_rgb(photo)
    rgba, source = cut_out_sample(photo, rgb, studio_cut_out)
    timings: dict[str, float] = {}
    tiles = [thumbnail(rgb, thumb_px), thumbnail(on_checkerboard(rgba), thumb_px)]
    for scene in SCENE_KEYS:
        started = time.perf_counter()
        image = render_scene(rgba, scene, SCENE_FRAME_PX)
        timings[scene] = time.perf_counter() - started
        tiles.append(thumbnail(image, thumb_px))
    started = time.perf_counter()
    jpeg = encode_marketplace_jpeg(render_marketplace(rgba))
    timings["marketplace"] = time.perf_counter() - started
    tiles.append(thumbnail(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), thumb_px))
    return Row(name=photo.name.removesuffix("_photo.jpg"), source=source, tiles=tiles), timings


def assemble(rows: list[Row], thumb_px: int) -> Image.Image:
    gap = max(2, thumb_px // 40)
    font = ImageFont.load_default(size=max(9, thumb_px // 12))
    caption_px = max(12, thumb_px // 9)
    width = len(COLUMNS) * (thumb_px + gap) + gap
    height = caption_px + len(rows) * (caption_px + thumb_px + gap) + gap
    sheet = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    for index, title in enumerate(COLUMNS):
        draw.text((gap + index * (thumb_px + gap) + thumb_px // 2, caption_px // 2), title, (40, 40, 40), font, "mm")
    top = caption_px
    for row in rows:
        draw.text((gap, top + caption_px // 2), f"{row.name}  ·  cut-out: {row.source}", (70, 70, 70), font, "lm")
        top += caption_px
        for index, tile in enumerate(row.tiles):
            sheet.paste(Image.fromarray(tile), (gap + index * (thumb_px + gap), top))
        top += thumb_px + gap
    return sheet


def save_web(sheet: Image.Image, path: Path) -> int:
    """A JPEG small enough for the README; quality steps down until it fits."""
    for quality in (88, 82, 76, 70, 60):
        out = io.BytesIO()
        sheet.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
        if out.tell() <= WEB_MAX_BYTES:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "contact_sheet.png")
    parser.add_argument("--thumb", type=int, default=384, help="thumbnail side of the full-size sheet, px")
    parser.add_argument("--web", type=Path, default=REPO / "docs" / "contact_sheet.jpg")
    parser.add_argument("--web-thumb", type=int, default=WEB_THUMB_PX)
    parser.add_argument("--matte", choices=("auto", "truth"), default="auto")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    args = parser.parse_args()

    photos = sorted(args.samples.glob("*_photo.jpg"))
    if not photos:
        sys.exit(f"no *_photo.jpg in {args.samples}")
    studio_cut_out = load_studio_cut_out() if args.matte == "auto" else None
    big_px = max(args.thumb, args.web_thumb)
    rows: list[Row] = []
    for photo in photos:
        row, timings = render_row(photo, studio_cut_out, big_px)
        rows.append(row)
        spent = "  ".join(f"{key} {seconds:.2f}s" for key, seconds in timings.items())
        print(f"{row.name:40s} cut-out: {row.source}\n{'':40s} {spent}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    full = assemble([Row(r.name, r.source, [thumbnail(t, args.thumb) for t in r.tiles]) for r in rows], args.thumb)
    full.save(args.out, optimize=True)
    print(f"wrote {args.out} ({full.width}×{full.height})")
    web = assemble(
        [Row(r.name, r.source, [thumbnail(t, args.web_thumb) for t in r.tiles]) for r in rows], args.web_thumb
    )
    size = save_web(web, args.web)
    print(f"wrote {args.web} ({web.width}×{web.height}, {size // 1024} KB)")


if __name__ == "__main__":
    main()
