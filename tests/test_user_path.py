"""The CLIP path as a user meets it (issue 19): one resize whatever the image source, class names
the CLIP's tokenizer cannot read, the class-name map, ``--test-fraction`` on ``zero-shot``, every
digit archive in ``data info``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipshield.data.domain import ImageSplit
from ipshield.data.sources import load_domains
from ipshield.errors import DataError

NUMERALS = [str(i) for i in range(10)]
WORDS = "zero one two three four five six seven eight nine".split()
NUM_MAP = ",".join(f"{n}={w}" for n, w in zip(NUMERALS, WORDS))
EXE = Path(sys.executable).parent / "ipshield"
needs_exe = pytest.mark.skipif(not EXE.is_file(), reason=f"the ipshield executable is not installed ({EXE})")


def _balanced(split: ImageSplit, per: int) -> tuple[np.ndarray, np.ndarray]:
    """``per`` images of every class of an in-memory split (class by class)."""
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:per] for c in range(10)])
    return split.images[idx], split.labels[idx]


def _folder_of(images: np.ndarray, labels: np.ndarray, root: Path, domain: str = "d", names=NUMERALS) -> list[Path]:
    """Write ``images`` as PNG files root/domain/{train,test}/<class>/<i>.png (all as test files; one
    train file per class) and return the test paths in array order."""
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        p = root / domain / "test" / names[int(y)] / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        paths.append(p)
    for c in names:
        p = root / domain / "train" / c / "x.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[0]).save(p)
    return paths


# --------------------------------------------------------------------------- one resize
def test_same_pixels_give_bit_identical_model_inputs_from_arrays_files_and_archives(small_clip, synthetic_domains,
                                                                                    tmp_path):
    """The same images as an array, as PNG files in a folder and in a digit archive: the CLIP gets
    bit-identical pixels and makes identical predictions (the review found 3-4 % flips before)."""
    from ipshield.models.zeroshot import ZeroShotClassifier

    dom = synthetic_domains["texture"]
    images, labels = _balanced(dom.test, 6)
    s = small_clip.image_size
    assert images.shape[1] != s  # the resize is exercised
    # the array path: native resolution, the adapter resizes (what evaluate_zero_shot does)
    x_array = small_clip.preprocess(ImageSplit(images, labels).to_tensor())
    # the folder path: files read and resized to the model's size, then preprocessed
    _folder_of(images, labels, tmp_path / "png")
    folder = load_domains("folder", root=tmp_path / "png", class_names=NUM_MAP)["d"]
    order = np.argsort([int(Path(p).stem) for p in folder.test.images])
    x_files = small_clip.preprocess(folder.test.to_tensor(s))[torch.from_numpy(order)]
    assert torch.equal(x_array, x_files)
    # the same files kept at their resolution (they share one size) give the same again
    assert torch.equal(x_array, small_clip.preprocess(folder.test.to_tensor())[torch.from_numpy(order)])
    # an archive of the same pixels (the digits source; already 32 px, so stored as they are)
    arc = tmp_path / "arc"
    arc.mkdir()
    np.savez(arc / "same.npz", train_images=images, train_labels=labels, test_images=images, test_labels=labels)
    archive = load_domains("digits", ["same"], root=arc)["same"]
    assert torch.equal(x_array, small_clip.preprocess(archive.test.to_tensor()))
    assert torch.equal(x_array, small_clip.preprocess(archive.test.to_tensor(s)))
    clf = ZeroShotClassifier(small_clip, WORDS)
    pred = clf.predict_logits(ImageSplit(images, labels).to_tensor()).argmax(-1)
    assert torch.equal(pred, clf.predict_logits(folder.test.to_tensor(s)).argmax(-1)[torch.from_numpy(order)])


def test_non_square_files_are_resized_and_cropped_like_preprocess(small_clip, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 30, 44, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    s = small_clip.image_size
    files = ImageSplit(paths, np.zeros(4))
    arrays = ImageSplit(images, np.zeros(4))
    assert files.to_tensor(s).shape == (4, 3, s, s)
    assert torch.equal(files.to_tensor(s), arrays.to_tensor(s))
    assert torch.equal(small_clip.preprocess(files.to_tensor(s)), small_clip.preprocess(arrays.to_tensor()))
    # files of different sizes cannot be stacked without a size: a clear error
    Image.fromarray(images[0][:20]).save(paths[0])
    with pytest.raises(DataError, match="different sizes"):
        ImageSplit(paths, np.zeros(4)).to_tensor()


def test_the_one_resize_is_clips_bicubic_preprocessing(small_clip):
    """preprocess is unchanged by the move (bicubic, anti-aliased when shrinking, clamped, centre
    crop): the zero-shot numbers of the embedded default stay what they were."""
    import torch.nn.functional as F

    from ipshield.data import transforms as T

    x = torch.rand(3, 3, 32, 32)
    s = small_clip.image_size
    want = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = torch.tensor(small_clip.image_mean).view(1, 3, 1, 1), torch.tensor(small_clip.image_std).view(1, 3, 1, 1)
    assert torch.equal(small_clip.preprocess(x), (want - mean) / std)
    assert torch.equal(T.resize(x, s), want) and torch.equal(T.resize_crop(x, s), want)
    # upsizing: no anti-aliasing; the shorter side sets the scale and the longer one is cropped
    y = torch.rand(2, 3, 10, 20)
    up = F.interpolate(y, size=(16, 32), mode="bicubic", align_corners=False, antialias=False).clamp(0, 1)
    assert torch.equal(T.resize_crop(y, 16), up[..., :, 8:24])


# --------------------------------------------------------------------------- class names
def test_class_names_the_tokenizer_cannot_read_are_refused(small_clip, monkeypatch):
    from ipshield.models.zeroshot import ALLOW_UNKNOWN_ENV, ZeroShotClassifier, unreadable_class_names

    assert small_clip.unknown_tokens("0") == (1, ["0"])
    assert small_clip.unknown_tokens("seven") == (1, [])
    assert unreadable_class_names(small_clip, WORDS) == {}
    assert set(unreadable_class_names(small_clip, NUMERALS)) == set(NUMERALS)
    assert list(unreadable_class_names(small_clip, ["back_pack", "seven 7", "zero"])) == ["back_pack"]  # 2 of 2; 1 of 2
    monkeypatch.delenv(ALLOW_UNKNOWN_ENV, raising=False)
    with pytest.raises(DataError) as exc:
        ZeroShotClassifier(small_clip, NUMERALS)
    assert "bare numerals" in str(exc.value) and "--class-names 0=zero,1=one" in exc.value.fix
    monkeypatch.setenv(ALLOW_UNKNOWN_ENV, "1")
    with pytest.warns(UserWarning, match="unknown words"):
        ZeroShotClassifier(small_clip, NUMERALS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZeroShotClassifier(small_clip, WORDS)


def test_class_name_maps(tmp_path):
    from ipshield.data.classnames import parse_class_names

    assert parse_class_names("0=zero, 1 = one") == {"0": "zero", "1": "one"}
    assert parse_class_names({0: "zero"}) == {"0": "zero"}
    assert parse_class_names(None) is None and parse_class_names("") is None
    (tmp_path / "m.yaml").write_text("0: zero\n'1': one\n")
    (tmp_path / "m.json").write_text(json.dumps({"0": "zero", "1": "one"}))
    assert parse_class_names(str(tmp_path / "m.yaml")) == parse_class_names(tmp_path / "m.json") == {"0": "zero", "1": "one"}
    for bad, match in [("0zero", "neither"), ("0=zero,=one", "cannot read"), ("0=a,0=b", "named twice"),
                       (str(tmp_path / "none.yaml"), "neither")]:
        with pytest.raises(DataError, match=match):
            parse_class_names(bad)
    (tmp_path / "list.yaml").write_text("- zero\n- one\n")
    with pytest.raises(DataError, match="must map"):
        parse_class_names(str(tmp_path / "list.yaml"))


def test_class_names_option_of_every_source(synthetic_domains, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(20) % 10
    _folder_of(images, labels, tmp_path / "f")
    plain = load_domains("folder", root=tmp_path / "f")["d"]
    assert plain.classes == NUMERALS
    renamed = load_domains("folder", root=tmp_path / "f", class_names=NUM_MAP)["d"]
    assert renamed.classes == WORDS and renamed.meta["class_folders"] == NUMERALS
    np.testing.assert_array_equal(renamed.test.labels, plain.test.labels)  # order, hence labels, kept
    # a partial map keeps the other names; a key that is no class or a repeated name is an error
    assert load_domains("folder", root=tmp_path / "f", class_names="0=zero")["d"].classes == ["zero", *NUMERALS[1:]]
    with pytest.raises(DataError, match="does not have: '11'"):
        load_domains("folder", root=tmp_path / "f", class_names="11=eleven")
    with pytest.raises(DataError, match="same name"):
        load_domains("folder", root=tmp_path / "f", class_names="0=1")
    # a class_names.yaml in the dataset's root is used when no map is given (an explicit map wins)
    (tmp_path / "f" / "class_names.yaml").write_text("".join(f"'{n}': {w}\n" for n, w in zip(NUMERALS, WORDS)))
    assert load_domains("folder", root=tmp_path / "f")["d"].classes == WORDS
    assert load_domains("folder", root=tmp_path / "f", class_names="0=nil")["d"].classes == ["nil", *NUMERALS[1:]]
    # any source takes the map (renamed after loading; the memoised domains are left alone)
    syn = load_domains("synthetic", ["clean"], n_train=10, n_test=10, class_names="zero=nought")["clean"]
    assert syn.classes[0] == "nought" and load_domains("synthetic", ["clean"], n_train=10, n_test=10)["clean"].classes[0] == "zero"


def test_every_digit_archive_is_a_domain_of_the_source(tmp_path):
    for name, hw in (("usps", 16), ("svhn", 32)):
        rng = np.random.default_rng(0)
        np.savez(tmp_path / f"{name}.npz", train_images=rng.integers(0, 256, (10, hw, hw), dtype=np.uint8),
                 train_labels=np.arange(10), test_images=rng.integers(0, 256, (10, hw, hw), dtype=np.uint8),
                 test_labels=np.arange(10))
    assert list(load_domains("digits", root=tmp_path)) == ["usps", "svhn"]  # known names first
    from typer.testing import CliRunner

    from ipshield.cli import app

    res = CliRunner().invoke(app, ["data", "info", "--source", "digits", "--root", str(tmp_path)])
    assert res.exit_code == 0 and "svhn" in res.output and "usps" in res.output, res.output


# --------------------------------------------------------------------------- the installed executable
def _run(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("IPSHIELD_DEBUG", None)
    e.pop("IPSHIELD_ALLOW_UNKNOWN_CLASS_NAMES", None)
    e.update(COLUMNS="200", PYTHONUNBUFFERED="1", IPSHIELD_CACHE=str(cwd / "cache"), **env)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=e)


@needs_exe
def test_zero_shot_exe_class_names_and_test_fraction(small_clip_dir, synthetic_domains, tmp_path):
    dom = synthetic_domains["clean"]
    _folder_of(*_balanced(dom.test, 4), tmp_path / "data", "clean")
    base = ["zero-shot", "--model", str(small_clip_dir), "--source", "folder", "--root", str(tmp_path / "data")]
    # numerals: refused with the fix, exit 2, no traceback
    r = _run(base, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "unknown words" in r.stderr and "--class-names 0=zero,1=one" in r.stderr and "Traceback" not in r.stderr
    # a malformed map: exit 2 before the model is loaded
    r = _run(base + ["--class-names", "0zero"], tmp_path)
    assert r.returncode == 2 and "neither FOLDER=NAME pairs" in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
    # with the map (from a file) and --test-fraction, it runs
    (tmp_path / "names.json").write_text(json.dumps(dict(zip(NUMERALS, WORDS))))
    r = _run(base + ["--class-names", str(tmp_path / "names.json"), "--test-fraction", "0.5"], tmp_path)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_zero_shot_cli_option_errors(small_clip_dir, tmp_path, capsys):
    """The other errors of the new options, in process (the same ``main`` as the executable)."""
    from ipshield.cli import main

    rng = np.random.default_rng(0)
    _folder_of(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10), tmp_path / "data")
    base = ["zero-shot", "--model", str(small_clip_dir), "--source", "folder", "--root", str(tmp_path / "data")]
    for args, match in [(["--class-names", "11=eleven"], "does not have: '11'"),
                        (["--class-names", NUM_MAP, "--test-fraction", "1.5"], r"test_fraction must be in [0, 1)"),
                        (["--source", "synthetic", "--test-fraction", "0.3"], "no option(s) ['test_fraction']")]:
        with pytest.raises(SystemExit) as exc:
            main(base + args)
        assert exc.value.code == 2 and match in capsys.readouterr().err, args


def test_protect_and_evaluate_take_the_class_name_map(small_clip_dir, synthetic_domains, tmp_path, capsys):
    """``--class-names`` reaches every command that builds class prompts: a prompt method trained on a
    folder of numeral-named classes, then evaluated on it (refused with the fix without the map)."""
    from ipshield.cli import main

    for name in ("clean", "inverted"):
        _folder_of(*_balanced(synthetic_domains[name].test, 3), tmp_path / "data", name)
    data = ["--source", "folder", "--root", str(tmp_path / "data")]
    run = tmp_path / "coop"
    base = ["protect", "coop", "--model", str(small_clip_dir), "--authorized", "clean", "--out", str(run), *data,
            "--set", "epochs=1"]
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert exc.value.code == 2 and "--class-names 0=zero,1=one" in capsys.readouterr().err
    main(base + ["--class-names", NUM_MAP])
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["accuracy"]["after"]) == {"clean", "inverted"}
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--run", str(run), *data])
    assert exc.value.code == 2 and "--class-names" in capsys.readouterr().err
    main(["evaluate", "--run", str(run), *data, "--class-names", NUM_MAP, "--out", str(tmp_path / "ev.json")])
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert set(ev["accuracy"]) == {"clean", "inverted"}
