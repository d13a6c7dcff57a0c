"""Robust image loading: every readable photo becomes an upright RGB image; anything else fails by path.

Benchmark downloads hold grayscale, CMYK, palette and RGBA files, PNGs named ``.jpg``, EXIF-rotated
phone photos and the odd truncated JPEG. :func:`load_rgb` turns the first kinds into upright RGB and
raises :class:`ImageLoadError` naming the file for the rest. :func:`encode_rgb` returns bytes ready to
store in a dataset, keeping the original file when it already is a plain upright RGB JPEG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}


class ImageLoadError(OSError):
    """A file that cannot be turned into an RGB image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot read file ({err.strerror or err})") from None


def decode(data: bytes, path: str | Path) -> Image.Image:
    """Open and fully decode; a truncated or corrupt file fails here, not later in a data loader."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(path, f"not a readable image ({err})") from None
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(path, f"truncated or corrupt image data ({err})") from None
    if img.width == 0 or img.height == 0:
        raise ImageLoadError(path, f"image has zero size {img.size}")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8-bit "L" (PIL's own conversion clips instead of scaling)."""
    arr = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    elif arr.max(initial=0) > 255:
        arr = arr / 257.0  # 16-bit range
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent areas are composited onto white rather than turning black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block is not worth rejecting the photo for
        return 1


def upright_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    try:
        if _orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError) as err:
        raise ImageLoadError(path, f"cannot convert {img.mode} image to RGB ({err})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an upright (EXIF-transposed) RGB PIL image.

    Raises :class:`ImageLoadError` (an ``OSError``) naming the path when the file is missing,
    not an image, truncated or corrupt.
    """
    data = read_bytes(path)
    return upright_rgb(decode(data, path), path)


def encode_rgb(path: str | Path) -> tuple[bytes, str]:
    """Bytes of the upright RGB image at ``path`` and their format ("JPEG" or "PNG").

    A plain RGB JPEG without EXIF rotation is returned byte for byte (no re-encoding loss); other
    JPEGs are re-encoded at quality 95 after conversion, lossless sources are written as PNG.
    """
    data = read_bytes(path)
    img = decode(data, path)
    source_format = img.format
    if source_format == "JPEG" and img.mode == "RGB" and _orientation(img) == 1:
        return data, "JPEG"
    rgb = upright_rgb(img, path)
    buf = io.BytesIO()
    if source_format == "JPEG":
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "JPEG"
    rgb.save(buf, format="PNG", compress_level=1)  # fast: these are few, and the disk cost is small
    return buf.getvalue(), "PNG"
