"""Safe image decoding for untrusted uploads: size checks before any decoding, a pixel limit read
from the header (decompression bombs), an allow-list of formats, and errors that say what is wrong
without echoing the input."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


class InputError(Exception):
    """A bad request; ``status`` is the HTTP status, ``code`` a stable machine-readable name."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def install_pil_limits(max_pixels: int) -> None:
    """Lower PIL's global decompression-bomb threshold to our limit (never raise it)."""
    from PIL import Image

    current = Image.MAX_IMAGE_PIXELS
    if current is None or current > max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def b64_to_bytes(data: str, max_bytes: int, index: int) -> bytes:
    if not isinstance(data, str) or not data:
        raise InputError(400, "bad_image", f"image {index}: empty or not a base64 string")
    data = _DATA_URL.sub("", data, count=1) if data.startswith("data:") else data
    # 4 base64 characters carry 3 bytes: refuse before decoding anything
    if (len(data) * 3) // 4 > max_bytes + 3:
        raise InputError(413, "image_too_large", f"image {index}: more than {max_bytes} bytes encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", f"image {index}: not valid base64") from None
    if len(raw) > max_bytes:
        raise InputError(413, "image_too_large", f"image {index}: {len(raw)} bytes, the limit is {max_bytes}")
    return raw


def header_pixels(raws: list[bytes]) -> float:
    """Total width * height claimed by the headers (inf when one cannot be read)."""
    from PIL import Image

    total = 0
    for raw in raws:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w, h = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS).size
            total += w * h
        except Exception:
            return float("inf")
    return total


def image_pixels(raw: bytes, index: int = 0) -> int:
    """Width * height from the header alone (nothing decoded), or ``InputError``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS).size
    except Image.DecompressionBombError:
        raise InputError(413, "image_too_many_pixels", f"image {index}: a header claiming more pixels than allowed") from None
    except Exception:
        raise InputError(400, "bad_image", f"image {index}: not a readable image (allowed: {', '.join(ALLOWED_FORMATS)})") from None
    if w <= 0 or h <= 0:
        raise InputError(400, "bad_image", f"image {index}: zero size")
    return int(w) * int(h)


def decode_image(raw: bytes, max_bytes: int, max_pixels: int, index: int = 0, shrink_to: int | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 ``[H, W, 3]`` RGB, or ``InputError``. ``shrink_to``: an image whose
    longer side is over it is reduced to fit (JPEG already while decoding), so a large photo is
    held at full size only inside this call."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > max_bytes:
        raise InputError(413, "image_too_large", f"image {index}: {len(raw)} bytes, the limit is {max_bytes}")
    if not raw:
        raise InputError(400, "bad_image", f"image {index}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)  # reads the header only
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InputError(400, "bad_image", f"image {index}: zero size")
            if w * h > max_pixels:
                raise InputError(413, "image_too_many_pixels", f"image {index}: {w}x{h} pixels, the limit is {max_pixels} pixels")
            im.seek(0)
            if shrink_to and max(w, h) > shrink_to and im.format == "JPEG":
                im.draft("RGB", (shrink_to, shrink_to))  # DCT scaling: decodes at 1/2, 1/4 or 1/8 size
            im = im.convert("RGB")  # decodes (first frame only)
            if shrink_to and max(im.size) > shrink_to:
                im.thumbnail((shrink_to, shrink_to), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(413, "image_too_many_pixels", f"image {index}: over the pixel limit ({max_pixels})") from None
    except UnidentifiedImageError:
        raise InputError(400, "bad_image", f"image {index}: not a readable image (allowed: {', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError, Exception):
        raise InputError(400, "bad_image", f"image {index}: corrupt or truncated image data") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(400, "bad_image", f"image {index}: could not be converted to RGB")
    return arr
