"""One entry point for every data source: ``load_domains(source, names, **options)``.

Sources are registered in ``ipshield.registry.DATASETS`` (``SourceSpec``: a loader taking
``names`` and keyword options, and ``domains(**options)``, the names of the domains it offers):

- ``synthetic``: the embedded procedural digits (``root`` is ignored);
- ``digits``: MNIST / USPS / MNIST-M archives (``root`` or env ``IPSHIELD_DIGITS``);
- ``folder``: image folders ``root/<domain>/<class>/<image>``.

Every source takes ``class_names`` too (a class-name map, see ``ipshield.data.classnames``): the
classes are renamed after loading, in their order, e.g. ``class_names="0=zero,1=one"`` for a
folder whose classes are named by digits (a CLIP's tokenizer may not read a bare numeral).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from ipshield.data.domain import Domain
from ipshield.errors import DataError
from ipshield.registry import DATASETS


def _synthetic_domains(**_options: Any) -> list[str]:
    from ipshield.data.synthetic import STYLES

    return list(STYLES)


def _digits_domains(root: Any = None, **_options: Any) -> list[str]:
    from ipshield.data.digits import available_digits

    return available_digits(root)


def _folder_domains(root: Any = None, **_options: Any) -> list[str]:
    from ipshield.data.folders import list_domains

    if root is None:
        raise DataError("the folder source needs --root", "pass --root DIR with one sub-folder per domain")
    return list_domains(root)


@DATASETS.register("synthetic", domains=_synthetic_domains, description="the embedded procedural digits in six styles")
def synthetic_source(names: Iterable[str] | None = None, root: Any = None, n_train: int = 2000, n_test: int = 500,
                     seed: int = 0, size: int = 32, disk_cache: bool = False) -> dict[str, Domain]:
    from ipshield.data.synthetic import load_synthetic

    del root  # generated, not read
    return load_synthetic(names, n_train=n_train, n_test=n_test, seed=seed, size=size, disk_cache=disk_cache)


@DATASETS.register("digits", domains=_digits_domains,
                   description="digit archives <name>.npz (MNIST, USPS, MNIST-M, ...) in --root or $IPSHIELD_DIGITS")
def digits_source(names: Iterable[str] | None = None, root: Any = None, size: int = 32, n_train: int | None = None,
                  n_test: int | None = None) -> dict[str, Domain]:
    from ipshield.data.digits import DIGIT_DOMAINS, available_digits, load_digits

    if names is None:  # every archive of the folder, the three known ones first in their usual order
        found = available_digits(root)
        names = [d for d in DIGIT_DOMAINS if d in found] + [d for d in found if d not in DIGIT_DOMAINS] or None
    return load_digits(names, root=root, size=size, n_train=n_train, n_test=n_test)


@DATASETS.register("folder", domains=_folder_domains,
                   description="image folders ROOT/<domain>/<class>/<image>")
def folder_source(names: Iterable[str] | None = None, root: Any = None, test_fraction: float = 0.2, seed: int = 0,
                  on_corrupt: str = "skip", verify: bool = True, extensions: Iterable[str] | None = None,
                  class_names: Any = None) -> dict[str, Domain]:
    from ipshield.data.folders import IMAGE_EXTENSIONS, load_image_folders

    return load_image_folders(root, names, test_fraction=test_fraction, seed=seed, on_corrupt=on_corrupt,
                              extensions=tuple(extensions) if extensions else IMAGE_EXTENSIONS, verify=verify,
                              class_names=class_names)


def load_domains(source: str, names: Iterable[str] | str | None = None, class_names: Any = None,
                 **options: Any) -> dict[str, Domain]:
    """Load the domains ``names`` (all of the source's domains when None; a comma-separated string
    is accepted) from the registered ``source``. Options left as None use the loader's default.
    ``class_names`` (any source): a class-name map (``"0=zero,1=one"``, a YAML / JSON file or a
    mapping; see ``ipshield.data.classnames``) renaming the classes after loading."""
    from ipshield.data.classnames import parse_class_names, rename_classes

    loader: Callable[..., dict[str, Domain]] = DATASETS.get(source).load
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()] or None
    params = inspect.signature(loader).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        accepted = [k for k in params if k != "names"] + ([] if "class_names" in params else ["class_names"])
        raise DataError(f"data source '{source}' has no option(s) {unknown}", f"its options are: {', '.join(accepted)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    if "class_names" in params:  # the source applies the map itself (the folder source: also its root file)
        return loader(names, class_names=class_names, **kwargs)
    mapping = parse_class_names(class_names)  # read before loading: a bad map fails fast
    return rename_classes(loader(names, **kwargs), mapping)


def source_domains(source: str, **options: Any) -> list[str]:
    """The names of the domains the data source ``source`` offers (with the same options as
    ``load_domains``, e.g. ``root``)."""
    spec = DATASETS.get(source)
    kwargs = {k: v for k, v in options.items() if v is not None}
    return list(spec.domains(**kwargs)) if spec.domains is not None else []
