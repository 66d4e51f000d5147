"""Shared test fixtures (each area adds its own with small edits)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_root() -> Path:
    """The folder of the real digit archives: $IPSHIELD_DIGITS, else ../shared/data/digits next to
    the repository; tests using it are skipped with the reason when it is absent."""
    env = os.environ.get("IPSHIELD_DIGITS", "").strip()
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "digits"
    if not (path / "mnist.npz").is_file():
        pytest.skip(f"real digit archives not found at {path} (set IPSHIELD_DIGITS to the folder holding mnist.npz, usps.npz, mnistm.npz)")
    return path


# The small CLIP of the test preset is pretrained once and cached; by default the cache lives in
# the repository (.cache/, git-ignored) so one CI run or one developer's sessions reuse it.
os.environ.setdefault("IPSHIELD_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(scope="session")
def small_clip_dir() -> Path:
    """The folder of the small CLIP of the "test" preset (pretrained on first use, then cached)."""
    from ipshield.models.tiny_clip import small_clip as _small_clip

    return _small_clip("test", show_progress=False)


@pytest.fixture(scope="session")
def small_clip(small_clip_dir):
    """The test-preset small CLIP loaded as a frozen ``CLIPAdapter``."""
    from ipshield.models.clip import load_clip

    return load_clip(small_clip_dir)


@pytest.fixture(scope="session")
def synthetic_domains():
    """A small result of ``load_synthetic`` (all styles, 200 train / 100 test images each)."""
    from ipshield.data.synthetic import load_synthetic

    return load_synthetic(n_train=200, n_test=100, seed=0)
