"""Image bytes in and out: validating uploads, normalising them, and converting provider results.

Every function here is synchronous and CPU-bound; callers run them in a thread (`asyncio.to_thread`) so the event
loop stays free. The upload format is decided by decoding the bytes, never by the declared content type.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from errors import ProviderRejected, UnreadableImage, UnsupportedImage

UPLOAD_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "HEIF": "HEIC/HEIF"}
RESULT_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
RAW_MAX_SIDE_PX = 4096
MIN_SIDE_PX = 32
MAX_ASPECT_RATIO = 10.0
# zlib level 3: half the encoding time of the default 6 for about 10 % larger files (bench/pipeline.py).
PNG_COMPRESS_LEVEL = 3
RAW_JPEG_QUALITY = 92

# Pillow's own bomb guard is a global that warns; `_open` checks dimensions itself before decoding.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class NormalisedUpload:
    jpeg: bytes
    width: int
    height: int
    source_format: str


@functools.cache
def _register_heif() -> None:
    # iPhones upload HEIC. Registered on first use rather than at import: importing a module changes nothing.
    pillow_heif.register_heif_opener()


def _open(data: bytes, *, max_pixels: int, formats: dict[str, str]) -> Image.Image:
    _register_heif()
    if not data:
        raise UnreadableImage("the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        if _starts_like_one_of(formats, data):
            raise UnreadableImage("the image is damaged: its header could not be read") from exc
        raise UnsupportedImage(f"not an image we accept; send {_names(formats)}") from exc
    # RuntimeError: pillow-heif's for libheif's own refusals ("Security limit exceeded").
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"the image could not be read: {exc}") from exc
    if image.format == "MPO" and "JPEG" in formats:
        # Phones put a second picture (an HDR gain map, a depth map) after the photo in a JPEG's MPF block, and
        # Pillow then calls the file MPO. The first picture is the photo.
        image.seek(0)
    elif image.format not in formats:
        raise UnsupportedImage(f"{image.format or 'this'} images are not accepted; send {_names(formats)}")
    width, height = image.size
    if width * height > max_pixels:
        raise UnreadableImage(f"the image is {width}×{height} pixels; at most {max_pixels:,} pixels are accepted")
    if min(width, height) < MIN_SIDE_PX or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnreadableImage(
            f"the image is {width}×{height} pixels; a product photo needs at least {MIN_SIDE_PX} pixels a side "
            f"and at most a {MAX_ASPECT_RATIO:.0f}:1 ratio"
        )
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
        raise UnsupportedImage("animated images are not accepted; send a single still photo")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as exc:
        raise UnreadableImage(f"the image is damaged or truncated: {exc}") from exc
    return image


def _starts_like_one_of(formats: dict[str, str], data: bytes) -> bool:
    """Whether the bytes begin like a format we take: then a failure to open them is damage (422), not a foreign
    file (415). Pillow reports a PNG with a bad IHDR checksum as unidentified."""
    signatures = {
        "JPEG": data[:3] == b"\xff\xd8\xff",
        "PNG": data[:8] == b"\x89PNG\r\n\x1a\n",
        "WEBP": data[:4] == b"RIFF" and data[8:12] == b"WEBP",
        "HEIF": data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1"),
    }
    return any(signatures.get(name, False) for name in formats)


def _names(formats: dict[str, str]) -> str:
    names = list(formats.values())
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert an embedded colour profile (Display P3 from phones, Adobe RGB) to sRGB, which browsers assume."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=image.mode)
    except (ImageCms.PyCMSError, OSError):
        return image  # an unreadable profile: keep the pixels as they are
    return converted if converted is not None else image


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale, don't clip, to 8 bits, whatever the values (a dark picture is still 16-bit).
        array = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((array >> 8).astype(np.uint8), "L")
    if image.mode == "P" or "transparency" in image.info:
        # A palette's transparent entry, or a tRNS colour key on an RGB or greyscale PNG.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalise_upload(data: bytes, *, max_pixels: int) -> NormalisedUpload:
    """Validate an upload and return it as an upright sRGB JPEG without metadata (EXIF and GPS are dropped).

    Raises `UnsupportedImage` (415) for what is not a JPEG, PNG, WebP or HEIC, `UnreadableImage` (422) for what is
    damaged, empty or too large in pixels.
    """
    image = _open(data, max_pixels=max_pixels, formats=UPLOAD_FORMATS)
    source_format = image.format or ""
    image = ImageOps.exif_transpose(image)
    image = _to_srgb(image) if image.mode in ("RGB", "RGBA") else image
    image = _flatten_to_rgb(image)
    if max(image.size) > RAW_MAX_SIDE_PX:
        image.thumbnail((RAW_MAX_SIDE_PX, RAW_MAX_SIDE_PX), Image.Resampling.LANCZOS)
    # Pillow's JPEG encoder copies a COM comment from `info`: the stored raw keeps nothing of the upload but pixels.
    image.info.clear()
    out = io.BytesIO()
    image.save(out, "JPEG", quality=RAW_JPEG_QUALITY, optimize=True)
    return NormalisedUpload(jpeg=out.getvalue(), width=image.width, height=image.height, source_format=source_format)


def result_to_png(data: bytes, *, provider: str, max_pixels: int) -> bytes:
    """A generated image (JPEG, PNG or WebP from a provider) as an RGB PNG."""
    try:
        image = _open(data, max_pixels=max_pixels, formats=RESULT_FORMATS)
    except (UnsupportedImage, UnreadableImage) as exc:
        raise ProviderRejected(provider, f"the result is not a usable image: {exc}") from exc
    if image.format == "PNG" and image.mode == "RGB":
        return data
    out = io.BytesIO()
    _flatten_to_rgb(image).save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def cutout_to_png(data: bytes, *, provider: str, max_pixels: int) -> bytes:
    """Check a cut-out really has transparency and return it as an RGBA PNG."""
    try:
        image = _open(data, max_pixels=max_pixels, formats=RESULT_FORMATS)
    except (UnsupportedImage, UnreadableImage) as exc:
        raise ProviderRejected(provider, f"the cut-out is not a usable image: {exc}") from exc
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        raise ProviderRejected(provider, "the cut-out has no alpha channel")
    rgba = image.convert("RGBA")
    low, high = rgba.getchannel("A").getextrema()
    if high == 0:
        raise ProviderRejected(provider, "the cut-out is fully transparent: no piece was found")
    if low == 255:
        raise ProviderRejected(provider, "the cut-out is fully opaque: the background was not removed")
    if image.format == "PNG" and image.mode == "RGBA":
        return data
    out = io.BytesIO()
    rgba.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def decode_rgb(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode trusted bytes (our own stored files) to an H×W×3 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_rgba(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode trusted bytes (our own stored files) to an H×W×4 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)


def encode_png(array: npt.NDArray[np.uint8]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()
