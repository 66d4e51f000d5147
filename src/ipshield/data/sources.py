"""One entry point for every data source: ``load_domains(source, names, **options)``.

Sources are registered in ``ipshield.registry.DATASETS`` (entries are loader functions taking
``names`` and keyword options):

- ``synthetic``: the embedded procedural digits (``root`` is ignored);
- ``digits``: MNIST / USPS / MNIST-M archives (``root`` or env ``IPSHIELD_DIGITS``);
- ``folder``: image folders ``root/<domain>/<class>/<image>``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from ipshield.data.domain import Domain
from ipshield.errors import DataError
from ipshield.registry import DATASETS


@DATASETS.register("synthetic")
def synthetic_source(names: Iterable[str] | None = None, root: Any = None, n_train: int = 2000, n_test: int = 500,
                     seed: int = 0, size: int = 32, disk_cache: bool = False) -> dict[str, Domain]:
    from ipshield.data.synthetic import load_synthetic

    del root  # generated, not read
    return load_synthetic(names, n_train=n_train, n_test=n_test, seed=seed, size=size, disk_cache=disk_cache)


@DATASETS.register("digits")
def digits_source(names: Iterable[str] | None = None, root: Any = None, size: int = 32, n_train: int | None = None,
                  n_test: int | None = None) -> dict[str, Domain]:
    from ipshield.data.digits import load_digits

    return load_digits(names, root=root, size=size, n_train=n_train, n_test=n_test)


@DATASETS.register("folder")
def folder_source(names: Iterable[str] | None = None, root: Any = None, test_fraction: float = 0.2, seed: int = 0,
                  on_corrupt: str = "skip", verify: bool = True, extensions: Iterable[str] | None = None) -> dict[str, Domain]:
    from ipshield.data.folders import IMAGE_EXTENSIONS, load_image_folders

    return load_image_folders(root, names, test_fraction=test_fraction, seed=seed, on_corrupt=on_corrupt,
                              extensions=tuple(extensions) if extensions else IMAGE_EXTENSIONS, verify=verify)


def load_domains(source: str, names: Iterable[str] | str | None = None, **options: Any) -> dict[str, Domain]:
    """Load the domains ``names`` (all of the source's domains when None; a comma-separated string
    is accepted) from the registered ``source``. Options left as None use the loader's default."""
    loader: Callable[..., dict[str, Domain]] = DATASETS.get(source)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()] or None
    params = inspect.signature(loader).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        accepted = [k for k in params if k != "names"]
        raise DataError(f"data source '{source}' has no option(s) {unknown}", f"its options are: {', '.join(accepted)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    return loader(names, **kwargs)
