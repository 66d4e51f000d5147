"""Data layer: synthetic generator, digit archives, image folders, sources, transforms, preview, CLI."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipshield.data import transforms as T
from ipshield.data.digits import load_digits
from ipshield.data.domain import Domain
from ipshield.data.folders import load_image_folders, read_image
from ipshield.data.sources import load_domains
from ipshield.data.synthetic import (DIGIT_CLASSES, STYLES, caption, image_attrs, load_synthetic, make_domain,
                                     style_description)
from ipshield.errors import DataError, IPShieldError


# --------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_labels_and_classes():
    d = make_domain("clean", n_train=50, n_test=30, seed=1)
    assert isinstance(d, Domain) and d.name == "clean"
    assert d.classes == DIGIT_CLASSES == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert d.train.images.shape == (50, 32, 32, 3) and d.train.images.dtype == np.uint8
    assert d.test.images.shape == (30, 32, 32, 3)
    assert d.train.labels.dtype == np.int64
    all_labels = np.concatenate([d.train.labels, d.test.labels])
    assert np.array_equal(np.bincount(all_labels, minlength=10), np.full(10, 8))  # balanced: 80 images / 10
    assert make_domain("noisy", 10, 5, size=48).train.images.shape == (10, 48, 48, 3)
    assert len(STYLES) >= 5


def test_synthetic_deterministic_by_seed():
    for style in STYLES:
        a = make_domain(style, 40, 20, seed=3)
        b = make_domain(style, 40, 20, seed=3)
        c = make_domain(style, 40, 20, seed=4)
        assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
        assert not np.array_equal(a.train.images, c.train.images)


def _style_features(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255
    hf = np.abs(np.diff(x, axis=2)).mean((1, 2, 3))[:, None]  # noise / texture energy
    sat = (x.max(-1) - x.min(-1)).mean((1, 2))[:, None]
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), hf, sat], 1)


def test_styles_are_visually_distinct(synthetic_domains):
    # per-domain mean colours differ pairwise ...
    means = {s: synthetic_domains[s].train.images.reshape(-1, 3).mean(0) for s in STYLES}
    for i, a in enumerate(STYLES):
        for b in STYLES[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 5, (a, b, means[a], means[b])
    # ... and crude image statistics alone tell the style of a test image most of the time
    xs = [_style_features(synthetic_domains[s].train.images) for s in STYLES]
    mu = np.concatenate(xs).mean(0)
    sd = np.concatenate(xs).std(0)
    centroids = np.stack([((x - mu) / sd).mean(0) for x in xs])
    correct = total = 0
    for k, s in enumerate(STYLES):
        f = (_style_features(synthetic_domains[s].test.images) - mu) / sd
        pred = ((f[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        correct += int((pred == k).sum())
        total += len(pred)
    assert correct / total > 0.75


def test_digits_are_legible_in_clean_style(synthetic_domains):
    """A linear classifier on raw pixels of 200 images is far above chance (10%)."""
    d = synthetic_domains["clean"]
    x = d.train.images.reshape(len(d.train), -1).astype(np.float64) / 255
    xt = d.test.images.reshape(len(d.test), -1).astype(np.float64) / 255
    w = np.linalg.solve(x.T @ x + 10 * np.eye(x.shape[1]), x.T @ np.eye(10)[d.train.labels])
    acc = ((xt @ w).argmax(1) == d.test.labels).mean()
    assert acc > 0.5


def test_load_synthetic_memo_and_errors():
    a = load_synthetic(["clean", "Color"], n_train=20, n_test=10)
    b = load_synthetic(["clean"], n_train=20, n_test=10)
    assert list(a) == ["clean", "color"]
    assert a["clean"] is b["clean"]
    with pytest.raises(DataError, match="unknown synthetic domain"):
        load_synthetic(["bogus"], n_train=5, n_test=5)


def test_synthetic_disk_cache_roundtrip(tmp_path, monkeypatch):
    from ipshield.data import synthetic

    monkeypatch.setenv("IPSHIELD_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "_MEMO", {})
    a = load_synthetic(["color"], n_train=12, n_test=6, seed=7, disk_cache=True)["color"]
    assert list((tmp_path / "synthetic").glob("color_*.npz"))
    monkeypatch.setattr(synthetic, "_MEMO", {})
    b = load_synthetic(["color"], n_train=12, n_test=6, seed=7, disk_cache=True)["color"]
    assert a is not b
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert a.meta["train_attrs"]["fg"] == b.meta["train_attrs"]["fg"]


def test_captions_contain_class_word_and_vary():
    rng = np.random.default_rng(0)
    for style in STYLES:
        assert style_description(style)
        caps = [caption(lab, style, rng) for lab in range(10) for _ in range(8)]
        for lab in range(10):
            assert all(DIGIT_CLASSES[lab] in c for c in caps[lab * 8:(lab + 1) * 8])
        assert len(set(caps)) > 40
    # python's random works too, and attributes name the actual colours
    d = make_domain("color", 10, 2, seed=0)
    attrs = image_attrs(d, "train", 0)
    caps = [caption(int(d.train.labels[0]), "color", random.Random(i), attrs=attrs) for i in range(60)]
    assert any(attrs["fg"] in c and attrs["bg"] in c for c in caps)
    assert caption(8, "clean", np.random.default_rng(1)).count("eight") >= 1


# --------------------------------------------------------------------------- digits
def _write_npz(path: Path, n=20, hw=16, rgb=False, **drop):
    rng = np.random.default_rng(0)
    shape = (n, hw, hw, 3) if rgb else (n, hw, hw)
    arrays = {
        "train_images": rng.integers(0, 256, shape, dtype=np.uint8), "train_labels": np.arange(n) % 10,
        "test_images": rng.integers(0, 256, shape, dtype=np.uint8)[: n // 2], "test_labels": np.arange(n // 2) % 10,
    }
    for k in drop:
        arrays.pop(k)
    np.savez(path, **arrays)


def test_digits_loader_on_tiny_archives(tmp_path, monkeypatch):
    _write_npz(tmp_path / "usps.npz", hw=16)
    _write_npz(tmp_path / "mnistm.npz", hw=32, rgb=True)
    doms = load_digits(["usps", "MNIST-M"], root=tmp_path, size=32)
    assert list(doms) == ["usps", "mnistm"]
    u = doms["usps"]
    assert u.classes == DIGIT_CLASSES
    assert u.train.images.shape == (20, 32, 32, 3) and u.train.images.dtype == np.uint8
    assert np.array_equal(u.train.images[..., 0], u.train.images[..., 2])  # gray -> RGB
    assert len(load_digits(["usps"], root=tmp_path, n_train=7, n_test=3)["usps"].train) == 7
    # the environment variable is used when no root is given
    monkeypatch.setenv("IPSHIELD_DIGITS", str(tmp_path))
    assert len(load_digits(["usps"])["usps"].test) == 10


def test_digits_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("IPSHIELD_DIGITS", raising=False)
    with pytest.raises(DataError, match="IPSHIELD_DIGITS"):
        load_digits(["mnist"])
    with pytest.raises(DataError, match="does not exist"):
        load_digits(["mnist"], root=tmp_path / "nope")
    _write_npz(tmp_path / "usps.npz")
    with pytest.raises(DataError, match=r"no archive mnist\.npz .*found: usps"):
        load_digits(["mnist"], root=tmp_path)
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_digits(["mnist"], root=tmp_path)
    _write_npz(tmp_path / "mnistm.npz", test_labels=None)
    with pytest.raises(DataError, match="lacks the arrays.*test_labels"):
        load_digits(["mnistm"], root=tmp_path)


@pytest.mark.digits
def test_real_digits(digits_root):
    doms = load_digits(root=digits_root, n_train=300, n_test=100)
    assert list(doms) == ["mnist", "usps", "mnistm"]
    for d in doms.values():
        assert d.train.images.shape == (300, 32, 32, 3) and d.test.images.shape == (100, 32, 32, 3)
        assert set(np.unique(d.train.labels)) == set(range(10))
    # MNIST / USPS: white digits on black; MNIST-M: colour
    assert doms["mnist"].train.images.mean() < 80 and doms["usps"].train.images.mean() < 110
    mm = doms["mnistm"].train.images.astype(int)
    assert np.abs(mm[..., 0] - mm[..., 2]).mean() > 5


# --------------------------------------------------------------------------- image folders
def _png(path: Path, value: int, size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def _tree(root: Path, domains: dict[str, list[str]], per_class=5):
    for dom, classes in domains.items():
        for ci, c in enumerate(classes):
            for i in range(per_class):
                _png(root / dom / c / f"img_{i}.png" if i % 2 else root / dom / c / f"img_{i}.JPG", 10 * ci + i)


def test_folders_case_insensitive_spaces_and_split(tmp_path):
    _tree(tmp_path, {"Amazon": ["dog", "cat"], "Real World": ["cat", "dog"], "webcam": ["cat", "dog", "bird"]})
    doms = load_image_folders(tmp_path, ["amazon", "real_world"], test_fraction=0.4, seed=0)
    assert list(doms) == ["Amazon", "Real World"]
    d = doms["Real World"]
    assert d.classes == ["cat", "dog"]
    assert len(d.train) == 6 and len(d.test) == 4  # 5 per class, 2 per class held out
    assert np.array_equal(np.bincount(d.test.labels), [2, 2])
    assert not d.train.in_memory
    x = d.test.to_tensor(8)
    assert x.shape == (4, 3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    again = load_image_folders(tmp_path, "Real World", test_fraction=0.4, seed=0)["Real World"]
    assert [p.name for p in again.test.images] == [p.name for p in d.test.images]
    other = [load_image_folders(tmp_path, ["real world"], test_fraction=0.4, seed=s)["Real World"] for s in range(1, 6)]
    assert any(sorted(map(str, o.test.images)) != sorted(map(str, d.test.images)) for o in other)


def test_folders_errors(tmp_path):
    _tree(tmp_path, {"amazon": ["cat", "dog"], "webcam": ["cat", "dog", "bird"]})
    with pytest.raises(DataError, match=r"webcam.*has extra \['bird'\]"):
        load_image_folders(tmp_path, ["amazon", "webcam"])
    with pytest.raises(DataError) as err:
        load_image_folders(tmp_path, ["dslr"])
    assert "'amazon'" in err.value.fix and "'webcam'" in err.value.fix
    with pytest.raises(DataError, match="does not exist"):
        load_image_folders(tmp_path / "missing")
    (tmp_path / "empty_domain").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folders(tmp_path, ["empty domain"])
    (tmp_path / "amazon" / "fish").mkdir()
    with pytest.raises(DataError, match="class 'fish'.*no images"):
        load_image_folders(tmp_path, ["amazon"])


def test_folders_corrupt_skip_or_fail(tmp_path):
    _tree(tmp_path, {"art": ["a", "b"]}, per_class=4)
    bad = tmp_path / "art" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        d = load_image_folders(tmp_path, test_fraction=0.25)["art"]
    assert d.train.skipped + d.test.skipped == 1 and d.meta["skipped"] == 1
    assert len(d.train) + len(d.test) == 8
    assert bad not in list(d.train.images) + list(d.test.images)
    with pytest.raises(DataError, match="broken.png"):
        load_image_folders(tmp_path, on_corrupt="fail")
    with pytest.raises(DataError, match="corrupt"):
        read_image(bad)


def test_folders_train_test_subfolders_and_read_image(tmp_path):
    _tree(tmp_path / "clipart" / "train", {"": ["x", "y"]}, per_class=3)
    _tree(tmp_path / "clipart" / "test", {"": ["x", "y"]}, per_class=2)
    d = load_image_folders(tmp_path)["clipart"]
    assert d.meta["split"] == "folders" and len(d.train) == 6 and len(d.test) == 4
    _png(tmp_path / "gray.png", 100, mode="L")
    img = read_image(tmp_path / "gray.png")
    assert img.shape == (16, 20, 3) and img.dtype == np.uint8 and (img == 100).all()


# --------------------------------------------------------------------------- sources
def test_load_domains_sources(tmp_path):
    doms = load_domains("synthetic", "clean, noisy", n_train=10, n_test=4)
    assert list(doms) == ["clean", "noisy"] and len(doms["noisy"].train) == 10
    _tree(tmp_path, {"A": ["c1", "c2"]}, per_class=2)
    assert list(load_domains("folder", root=tmp_path)) == ["A"]
    with pytest.raises(DataError, match="no option"):
        load_domains("synthetic", n_trian=3)
    with pytest.raises(IPShieldError, match="unknown data source"):
        load_domains("imagenet")
    from ipshield.registry import DATASETS

    assert {"synthetic", "digits", "folder"} <= set(DATASETS.names())


# --------------------------------------------------------------------------- transforms
def test_grid_watermark_pattern_exact():
    x = torch.rand(2, 3, 7, 6) * 0.9
    y = T.grid_watermark(x)
    rows = torch.arange(7)[:, None] % 2 == 0
    cols = torch.arange(6)[None, :] % 2 == 0
    white = (rows | cols).expand_as(y)
    assert torch.all(y[white] == 1.0)
    assert torch.equal(y[~white], x[~white])
    assert float((y == 1.0).float().mean()) == pytest.approx(float(white.float().mean()))
    assert float(x.max()) < 1.0  # input untouched
    y3 = T.grid_watermark(x[0], stride=3)
    assert y3.shape == (3, 7, 6) and torch.all(y3[:, 3, :] == 1) and torch.all(y3[:, :, 3] == 1) and float(y3[0, 1, 1]) < 1


def test_randaugment_deterministic_changes_images_and_stays_in_range(synthetic_domains):
    x = synthetic_domains["color"].test.to_tensor()[:64]
    a = T.strong_augment(x, torch.Generator().manual_seed(0))
    b = T.strong_augment(x, torch.Generator().manual_seed(0))
    c = T.strong_augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    per_image = (a - x).abs().mean((1, 2, 3))
    assert float(per_image.mean()) > 0.05 and float((per_image > 0.01).float().mean()) > 0.9
    assert T.strong_augment(x[0], torch.Generator().manual_seed(0)).shape == x[0].shape
    # no ops and no cutout: identity
    ident = T.RandAugment(n_ops=0, cutout=0)(x)
    assert torch.equal(ident, x)


def test_randaugment_each_op_and_cutout():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g) * 0.6 + 0.2
    for name, fn in T.RANDAUGMENT_OPS.items():
        y = fn(x.clone(), torch.full((6,), 0.8), torch.ones(6)).clamp(0, 1)
        assert y.shape == x.shape, name
        assert float((y - x).abs().mean()) > 1e-3, name
    ra = T.RandAugment(cutout=16)
    assert ra.cutout_side(224) == 16 and ra.cutout_side(32) == 2
    big = T.RandAugment(p=0.0, cutout=16, cutout_ref=32)
    y = big(x, torch.Generator().manual_seed(3))
    changed = (y != x).any(1).flatten(1).sum(1)
    assert torch.all(changed <= 256) and torch.all(changed >= 64)  # a 16x16 hole, clipped at most to a quarter
    assert torch.all(y[(y != x)] == 0.5)


def test_equalize_spreads_histogram():
    x = torch.linspace(0.4, 0.6, 32 * 32).view(1, 1, 32, 32).expand(1, 3, 32, 32).contiguous()
    y = T.RANDAUGMENT_OPS["equalize"](x, torch.ones(1), torch.ones(1))
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0


def test_geometric_transforms():
    x = torch.rand(4, 3, 40, 30)
    assert T.resize(x, 16).shape == (4, 3, 16, 16)
    assert T.resize(x, (20, 10)).shape == (4, 3, 20, 10)
    const = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(T.resize(const, 17), torch.full((1, 3, 17, 17), 0.3), atol=1e-6)
    cc = T.center_crop(x, 10)
    assert torch.equal(cc, x[..., 15:25, 10:20])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1, r2 = T.random_resized_crop(x, 24, generator=g1), T.random_resized_crop(x, 24, generator=g2)
    assert r1.shape == (4, 3, 24, 24) and torch.equal(r1, r2)
    assert torch.equal(T.random_hflip(x, p=1.0), x.flip(-1)) and torch.equal(T.random_hflip(x, p=0.0), x)
    n = T.normalize(x, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    assert torch.allclose(n[:, 1], (x[:, 1] - 0.4) / 0.25)
    with pytest.raises(TypeError):
        T.resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2)


# --------------------------------------------------------------------------- preview and CLI
def test_preview_writes_png(tmp_path, synthetic_domains):
    from ipshield.data.preview import preview_grid

    out = preview_grid(synthetic_domains, tmp_path / "grid.png", per_domain=4)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100 * len(synthetic_domains) // 2


def test_cli_data_preview_and_info(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ipshield.cli import app, main

    out = tmp_path / "g.png"
    res = CliRunner().invoke(app, ["data", "preview", "--domains", "clean,texture", "--n-train", "20", "--n-test", "10",
                                   "--per-domain", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["data", "info", "--domains", "noisy", "--n-train", "12", "--n-test", "3"])
    assert res.exit_code == 0 and "noisy" in res.output and "12" in res.output
    monkeypatch.delenv("IPSHIELD_DIGITS", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["data", "info", "--source", "digits"])
    assert exc.value.code == 2


def test_no_warnings_on_synthetic_to_tensor(synthetic_domains):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = synthetic_domains["outline"].train.to_tensor(24)
    assert x.shape == (200, 3, 24, 24)
