"""Reading and checking single image files (the lowest data module: no other ipshield.data import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ipshield.errors import DataError


def read_image(path: str | Path) -> np.ndarray:
    """One image file as uint8 [H, W, 3] RGB (gray, palette and alpha images are converted)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {p} does not exist", "check the dataset folder") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"image {p} is corrupt or not an image ({exc.__class__.__name__}: {exc})",
                        "delete or replace the file, or load with on_corrupt='skip'") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def verify_image(path: str | Path) -> str | None:
    """None when ``path`` looks like a valid image (PIL header + ``verify``), else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 (any failure means unreadable)
        return f"{exc.__class__.__name__}: {exc}"
    return None
