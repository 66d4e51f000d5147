"""Real digit domains (MNIST, USPS, MNIST-M) read from NumPy archives.

Each archive ``<name>.npz`` holds ``train_images``, ``train_labels``, ``test_images``,
``test_labels`` (uint8 images [N, H, W] gray or [N, H, W, 3] RGB, integer labels 0..9). The folder
is given by the ``root`` argument or the environment variable ``IPSHIELD_DIGITS``; it is never
hard-coded and the data are never copied into the package.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ipshield.data.domain import Domain, ImageSplit
from ipshield.data.synthetic import DIGIT_CLASSES
from ipshield.errors import DataError

ENV_VAR = "IPSHIELD_DIGITS"
DIGIT_DOMAINS = ("mnist", "usps", "mnistm")
_ALIASES = {"mnist-m": "mnistm", "mnist_m": "mnistm", "mnist m": "mnistm"}
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def digits_root() -> Path | None:
    """The digit-archive folder from ``IPSHIELD_DIGITS``, or None when the variable is unset."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def _resolve_root(root: str | Path | None) -> Path:
    path = Path(root).expanduser() if root else digits_root()
    if path is None:
        raise DataError(
            "no folder of digit archives was given",
            f"set {ENV_VAR} or pass --digits-root (root= in Python) to the folder holding mnist.npz, usps.npz, mnistm.npz",
        )
    if not path.is_dir():
        raise DataError(f"digit folder {path} does not exist",
                        f"set {ENV_VAR} or pass --digits-root to the folder holding the .npz archives")
    return path


def available_digits(root: str | Path | None = None) -> list[str]:
    """Names of the archives (``*.npz``) found in the digit folder."""
    return sorted(p.stem for p in _resolve_root(root).glob("*.npz"))


def _to_rgb_resized(images: np.ndarray, size: int, path: Path, key: str, batch: int = 2048) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path.name}: '{key}' has shape {images.shape}, expected [N, H, W] or [N, H, W, 3]",
                        "rebuild the archive with gray or RGB images")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and float(np.nanmax(images)) <= 1.0 + 1e-6:
            images = images * 255.0
        images = np.clip(np.nan_to_num(images), 0, 255).round().astype(np.uint8)
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + batch] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _take(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of a deterministic random subset of ``n`` items (all, in order, when n is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 0:
        raise DataError(f"subset size must be >= 0 (got {n})", "pass a non-negative n_train / n_test")
    return np.sort(np.random.default_rng(0).permutation(len(labels))[:n])


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def load_digit_domain(name: str, root: str | Path | None = None, size: int = 32, n_train: int | None = None,
                      n_test: int | None = None) -> Domain:
    """One digit domain read from ``<root>/<name>.npz``."""
    folder = _resolve_root(root)
    key = _canonical(name)
    path = folder / f"{key}.npz"
    if not path.is_file():
        found = sorted(p.stem for p in folder.glob("*.npz"))
        raise DataError(f"no archive {path.name} in {folder} (found: {', '.join(found) or 'none'})",
                        f"choose one of the archives found, or point {ENV_VAR} / --digits-root at the right folder")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing} (has {sorted(z.files)})",
                                "each archive needs train_images, train_labels, test_images, test_labels")
            arrays = {k: z[k] for k in _KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({exc})", "replace the file with a valid archive") from None

    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        labels = np.asarray(labels).reshape(-1)
        if len(images) != len(labels):
            raise DataError(f"{path.name}: {len(images)} {split} images but {len(labels)} labels",
                            "rebuild the archive with one label per image")
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{path.name}: {split} labels must be integers 0..9 (got {labels.dtype}, "
                            f"range {labels.min()}..{labels.max()})", "store digit labels 0..9")
        idx = _take(labels, n)
        splits[split] = ImageSplit(_to_rgb_resized(images[idx], size, path, f"{split}_images"), labels[idx].astype(np.int64))
    return Domain(key, list(DIGIT_CLASSES), splits["train"], splits["test"],
                  meta={"source": "digits", "path": str(path), "size": size})


def load_digits(names: Iterable[str] | str | None = DIGIT_DOMAINS, root: str | Path | None = None, size: int = 32,
                n_train: int | None = None, n_test: int | None = None) -> dict[str, Domain]:
    """The digit domains ``names`` as RGB ``size`` x ``size`` images, keyed by name (``n_train`` /
    ``n_test``: a deterministic random subset of each split; None keeps all)."""
    if names is None:
        names = DIGIT_DOMAINS
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise DataError("no digit domains requested", f"name at least one of: {', '.join(DIGIT_DOMAINS)}")
    return {_canonical(n): load_digit_domain(n, root, size, n_train, n_test) for n in names}
