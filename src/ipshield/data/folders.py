"""Image-folder datasets laid out as ``root/<domain>/<class>/<image>`` (Office-31, Office-Home,
DomainNet as distributed).

- Domain names are matched case-insensitively, with spaces, ``_`` and ``-`` treated alike
  (``real_world`` finds ``Real World``); the returned dict is keyed by the folder's own name.
- A domain folder may hold ``train/`` and ``test/`` subfolders (each ``<class>/<image>``): they
  are used as the splits. Otherwise a deterministic stratified split (``test_fraction`` of each
  class, seeded) is made. A single ``images/`` level (Office-31's ``amazon/images/<class>``) is
  descended into.
- Classes are the sorted class-folder names; all chosen domains must have the same classes.
- Class names: ``class_names`` (a map ``{folder name: name}``, ``"0=zero,1=one"`` or a YAML / JSON
  file; see ``ipshield.data.classnames``) renames the classes, keeping their order; without it a
  ``ROOT/class_names.yaml`` (``.yml``, ``.json``) next to the domain folders is used when present.
- Images stay on disk (a split holds paths, loaded lazily). Every file is checked when the
  dataset is loaded (a cheap PIL ``verify``): with ``on_corrupt="skip"`` unreadable files are left
  out and counted (``ImageSplit.skipped`` and a warning); with ``"fail"`` the first one raises.
"""

from __future__ import annotations

import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.data.images import read_image, verify_image  # noqa: F401 (read_image re-exported)
from ipshield.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def list_domains(root: str | Path) -> list[str]:
    """The domain folders under ``root`` (sorted, hidden folders excluded)."""
    r = _check_root(root)
    return sorted(p.name for p in r.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_root(root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise DataError("no dataset folder was given", "pass --root (root= in Python): the folder holding one folder per domain")
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(f"dataset folder {r} does not exist", "pass --root: the folder holding one folder per domain")
    if not r.is_dir():
        raise DataError(f"dataset path {r} is not a folder", "pass the folder holding one folder per domain")
    return r


def _resolve_domains(root: Path, names: Iterable[str] | str | None) -> list[Path]:
    available = list_domains(root)
    if not available:
        raise DataError(f"dataset folder {root} has no domain folders", "lay the data out as root/<domain>/<class>/<image>")
    if names is None:
        return [root / a for a in available]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    by_norm: dict[str, list[str]] = {}
    for a in available:
        by_norm.setdefault(_norm(a), []).append(a)
    out = []
    for n in names:
        hits = by_norm.get(_norm(n), [])
        if not hits:
            raise DataError(f"no domain '{n}' in {root}", f"available domains: {', '.join(repr(a) for a in available)}")
        if len(hits) > 1:
            raise DataError(f"domain name '{n}' matches several folders in {root}: {hits}", "rename the folders apart")
        if root / hits[0] not in out:
            out.append(root / hits[0])
    if not out:
        raise DataError("no domains requested", f"available domains: {', '.join(repr(a) for a in available)}")
    return out


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def _scan(folder: Path, domain: str, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """{class name: sorted image paths} of a ``<class>/<image>`` folder."""
    classes = _class_dirs(folder)
    if not classes:
        raise DataError(f"domain '{domain}' ({folder}) has no class folders",
                        "lay the data out as root/<domain>/<class>/<image>")
    out = {}
    for c in classes:
        files = _images_in(c, extensions)
        if not files:
            raise DataError(f"class '{c.name}' of domain '{domain}' ({c}) has no images "
                            f"(looked for {', '.join(extensions)})", "add images or remove the empty class folder")
        out[c.name] = files
    return out


def _split_stratified(files: dict[str, list[Path]], classes: list[str], test_fraction: float, seed: int,
                      domain: str) -> tuple[list[Path], list[int], list[Path], list[int]]:
    tr_p: list[Path] = []
    tr_y: list[int] = []
    te_p: list[Path] = []
    te_y: list[int] = []
    for ci, c in enumerate(classes):
        items = files[c]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(f"{domain}/{c}".encode())])
        order = rng.permutation(len(items))
        n_test = int(round(len(items) * test_fraction))
        if len(items) > 1:
            n_test = min(max(n_test, 1 if test_fraction > 0 else 0), len(items) - 1)
        else:
            n_test = 0
        test_idx = set(order[:n_test].tolist())
        for i, p in enumerate(items):
            if i in test_idx:
                te_p.append(p)
                te_y.append(ci)
            else:
                tr_p.append(p)
                tr_y.append(ci)
    return tr_p, tr_y, te_p, te_y


def _filter_corrupt(paths: list[Path], labels: list[int], on_corrupt: str, domain: str, split: str) -> ImageSplit:
    keep_p, keep_y, bad = [], [], []
    for p, y in zip(paths, labels):
        reason = verify_image(p)
        if reason is None:
            keep_p.append(p)
            keep_y.append(y)
            continue
        if on_corrupt == "fail":
            raise DataError(f"image {p} (domain '{domain}') is corrupt or not an image ({reason})",
                            "delete or replace the file, or pass --on-corrupt skip to leave such files out")
        bad.append(p)
    if bad:
        shown = ", ".join(str(b.name) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"domain '{domain}' {split}: skipped {len(bad)} unreadable image(s): {shown}", stacklevel=3)
    return ImageSplit(keep_p, np.asarray(keep_y, dtype=np.int64), skipped=len(bad))


def _load_one(folder: Path, test_fraction: float, seed: int, on_corrupt: str, extensions: Sequence[str],
              verify: bool) -> Domain:
    domain = folder.name
    sub = {p.name.lower(): p for p in _class_dirs(folder)}
    if set(sub) == {"images"}:  # Office-31: <domain>/images/<class>/<image>
        folder = sub["images"]
        sub = {p.name.lower(): p for p in _class_dirs(folder)}
    if "train" in sub and "test" in sub:
        tr = _scan(sub["train"], domain, extensions)
        te = _scan(sub["test"], domain, extensions)
        if sorted(tr) != sorted(te):
            missing, extra = sorted(set(tr) - set(te)), sorted(set(te) - set(tr))
            raise DataError(f"domain '{domain}': train and test class folders differ (test lacks {missing}, "
                            f"has extra {extra})", "give train/ and test/ the same class folders")
        classes = sorted(tr)
        tr_p = [p for ci, c in enumerate(classes) for p in tr[c]]
        tr_y = [ci for ci, c in enumerate(classes) for _ in tr[c]]
        te_p = [p for ci, c in enumerate(classes) for p in te[c]]
        te_y = [ci for ci, c in enumerate(classes) for _ in te[c]]
        split_kind = "folders"
    else:
        files = _scan(folder, domain, extensions)
        classes = sorted(files)
        tr_p, tr_y, te_p, te_y = _split_stratified(files, classes, test_fraction, seed, domain)
        split_kind = "stratified"
    if verify:
        train = _filter_corrupt(tr_p, tr_y, on_corrupt, domain, "train")
        test = _filter_corrupt(te_p, te_y, on_corrupt, domain, "test")
    else:
        train, test = ImageSplit(tr_p, tr_y), ImageSplit(te_p, te_y)
    if len(train) + len(test) == 0:
        raise DataError(f"domain '{domain}' has no readable images", "check the image files")
    return Domain(domain, classes, train, test,
                  meta={"source": "folder", "path": str(folder), "split": split_kind, "test_fraction": test_fraction,
                        "seed": seed, "skipped": train.skipped + test.skipped})


def load_image_folders(root: str | Path, domains: Iterable[str] | str | None = None, test_fraction: float = 0.2,
                       seed: int = 0, on_corrupt: str = "skip", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                       verify: bool = True, class_names: Any = None) -> dict[str, Domain]:
    """Domains read from ``root/<domain>/<class>/<image>``, keyed by folder name (all domains when
    ``domains`` is None). See the module docstring for matching, splits, class names and corrupt
    files."""
    from ipshield.data.classnames import find_class_names_file, parse_class_names, rename_classes

    if on_corrupt not in ("skip", "fail"):
        raise DataError(f"on_corrupt must be 'skip' or 'fail' (got {on_corrupt!r})", "pass on_corrupt='skip' or 'fail'")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be in [0, 1) (got {test_fraction})", "pass e.g. test_fraction=0.2")
    r = _check_root(root)
    folders = _resolve_domains(r, domains)
    mapping, origin = parse_class_names(class_names), "the class-name map"
    if mapping is None:
        found = find_class_names_file(r)
        if found is not None:
            mapping, origin = parse_class_names(found), f"the class-name file {found}"
    out = {f.name: _load_one(f, float(test_fraction), seed, on_corrupt, extensions, verify) for f in folders}
    check_same_classes(list(out.values()))
    return rename_classes(out, mapping, origin)
