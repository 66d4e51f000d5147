"""Digits benchmark of the classifier protections: MAP (SA, SF, DF), NTL and CUTI-domain on the
real MNIST, USPS and MNIST-M domains (32 px RGB), every ordered pair, plus the cost-to-break
table of the domain attacks (fine-tuning with k labels, SHOT-style adaptation).

Output folder::

    run.json, config.yaml           the benchmark config and seed
    sources/<domain>/               source classifier per authorized domain (trained once, reused)
    pseudo/<domain>.safetensors     pseudo-source images synthesised from that source model (SF/DF)
    models/<cell>/                  run folder of every protection (protected model + metrics.json)
    cells/<cell>.json               the result of every finished cell (a rerun skips it)
    results.csv, results.md         accuracy before/after, Drop_a, Drop_u, ST-D per method and pair
    attacks.csv, attacks.md         unauthorized accuracy recovered by each attack (cost to break), with
                                    the from-scratch reference (same architecture, same k images, same
                                    steps) and the protection margin
    robust.csv, robust.md,          with ``robust`` (a list of attacks, the ``digits-robust`` suite): the
    robust-labels.csv, robust.html  attack suite (``ipshield.attacks.robust``): every attack and k on every
                                    protected model, the unprotected model under the same attack, the
                                    from-scratch reference, the protection margin, the labels an attacker
                                    needs to match the unprotected model; plots (accuracy against k,
                                    one radar chart per method) in robust.html
    ownership.csv, ownership.md     with ``ownership``: the ownership scenario per source and method
                                    (the unprotected and the protected model on grid-watermarked
                                    authorized test images)

Any data source works (``source``/``data``: e.g. a ``folder`` source and its domain names in
``pairs``), not only the three digit archives.

DF-MAP and target-free NTL (``ntl-tf``, not in the default methods) never see unauthorized data:
each is trained once per source domain and evaluated on every unauthorized domain. Sizes
([ours]): source backbones trained from scratch (no pretrained weights), balanced subsets of
``n_train`` training and ``n_test`` test images per domain.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import field_validator

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError
from ipshield.runs import write_json

DOMAINS = ("mnist", "usps", "mnistm")
ALL_PAIRS = tuple((a, b) for a in DOMAINS for b in DOMAINS if a != b)
#: the methods of the issue's table (the default) and every method the benchmark can run
DEFAULT_METHODS = ("sa-map", "sf-map", "df-map", "ntl", "cuti")


def classifier_methods() -> tuple[str, ...]:
    """Every registered classifier method (the default ones first): what ``--methods`` accepts."""
    from ipshield.registry import METHODS

    others = sorted(s.name for s in METHODS.specs() if s.model == "classifier" and s.name not in DEFAULT_METHODS)
    return DEFAULT_METHODS + tuple(others)


class DigitsBenchConfig(BaseConfig):
    pairs: list[tuple[str, str]] = list(ALL_PAIRS)
    methods: list[str] = list(DEFAULT_METHODS)
    seed: int = 0
    arch: str = "vgg_small"
    #: training images per domain for the protections and the source models (balanced subset)
    n_train: int = 6000
    n_test: int = 1000
    source_epochs: int = 6
    #: optimisation steps of every protection (mask steps for MAP, fine-tuning steps for NTL/CUTI);
    #: None = each method's own default (300; SA-MAP 450)
    steps: int | None = None
    #: pseudo-source generator steps (None = the method's own, 1000) and pool size (SF/DF-MAP)
    gen_steps: int | None = None
    n_pseudo: int = 2000
    #: attacks
    attacks: bool = True
    ks: list[int] = [10, 100, 1000]
    attack_steps: int = 80
    shot_steps: int = 100
    #: also attack the unprotected source model (the reference for the cost to break)
    attack_source: bool = True
    #: the honest from-scratch reference: the same architecture trained from random weights on the
    #: same labelled images with the same steps (per unauthorized domain and k)
    scratch: bool = True
    #: the attack suite (``ipshield.attacks.robust``): attack names of the ATTACKS registry (classifier
    #: attacks); empty = the classic cost-to-break table (fine-tuning with each k, SHOT)
    robust: list[str] = []
    #: config overrides per attack of the suite, e.g. {"nrc": {"steps": 60}} (k-attacks get
    #: ``attack_steps``, ``shot`` gets ``shot_steps`` unless set here)
    attack_options: dict[str, dict[str, Any]] = {}
    #: test images per domain for the attacks (None: ``n_test``)
    attack_n_test: int | None = None
    #: the data source and its options (``ipshield.data.sources.load_domains``); the domain names are
    #: those of ``pairs``
    source: str = "digits"
    data: dict[str, Any] = {}
    #: extra config overrides per method, e.g. {"sa-map": {"kl_cap": 8}}
    method_options: dict[str, dict[str, Any]] = {}
    #: method variants: a label of ``methods`` -> the registered method it runs, e.g.
    #: {"sa-map-nft": "sa-map"}; the variant gets ``method_options`` of that method, then its own
    #: (``method_options["sa-map-nft"]``), and its own rows, cells and attacks
    variants: dict[str, str] = {}
    #: also run the ownership scenario (grid watermark on the authorized domain) once per source
    #: domain and method (ntl-tf excluded: its target is generated, the watermark is known)
    ownership: bool = False

    @field_validator("robust", mode="before")
    @classmethod
    def _robust(cls, v: Any) -> Any:
        if isinstance(v, str):
            from ipshield.attacks.robust import ROBUST_ATTACKS

            return list(ROBUST_ATTACKS) if v.strip().lower() in ("all", "default") else [x.strip() for x in v.split(",") if x.strip()]
        return v

    @classmethod
    def smoke(cls, **kw: Any) -> "DigitsBenchConfig":
        base = dict(pairs=[("mnist", "usps")], n_train=600, n_test=200, source_epochs=5, steps=40, gen_steps=20,
                    n_pseudo=128, ks=[10, 100], attack_steps=10, shot_steps=10,
                    # 40 steps cannot move scores from 0.3 across 0: start the masks closer to the threshold
                    method_options={m: {"score_init": 0.05} for m in ("sa-map", "sf-map", "df-map")})
        base.update(kw)
        return cls.build(base)


def _config_digest(cfg: Any) -> str:
    """What a protection cell's result depends on in its method's config (every field, defaults too)."""
    import hashlib

    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_pairs(text: str | None, domains: Sequence[str] | None = None) -> list[tuple[str, str]] | None:
    """``"mnist:usps,usps:mnistm"`` (``>`` also accepted) -> [("mnist", "usps"), ...]; ``domains``:
    the names allowed (None: any name, checked when the data source loads them)."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        item = item.strip().replace(">", ":")
        if not item:
            continue
        parts = [p.strip().lower() for p in item.split(":")]
        if len(parts) != 2 or parts[0] == parts[1] or not all(parts) or (domains is not None and any(p not in domains for p in parts)):
            allowed = f" with domains from {', '.join(domains)}" if domains is not None else ""
            raise ConfigError(f"bad pair '{item}'", f"write pairs as authorized:unauthorized{allowed}")
        out.append((parts[0], parts[1]))
    return out


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _markdown(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c[0]), c[2]) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


RESULT_COLUMNS = [
    ("method", "method", 0), ("authorized", "authorized", 0), ("unauthorized", "unauthorized", 0),
    ("acc_a_before", "Acc_a before", 1), ("acc_a_after", "Acc_a after", 1), ("acc_u_before", "Acc_u before", 1),
    ("acc_u_after", "Acc_u after", 1), ("drop_a", "Drop_a", 1), ("drop_u", "Drop_u", 1), ("st_d", "ST-D", 4),
    ("sparsity", "pruned %", 1), ("seconds", "s", 0), ("seed", "seed", 0),
]
ATTACK_COLUMNS_BASE = [("method", "method", 0), ("authorized", "authorized", 0), ("unauthorized", "unauthorized", 0),
                       ("acc_u_source", "Acc_u source", 1), ("acc_u_protected", "Acc_u protected", 1)]

#: the long table of the attack suite (one row per model, pair, attack and k) and the labels-to-match table
ROBUST_COLUMNS = ["method", "authorized", "unauthorized", "seed", "attack", "k", "budget", "reference", "acc_u_source",
                  "acc_u_protected", "attacked", "unprotected", "scratch", "margin", "vs_unprotected"]
LABEL_COLUMNS = ["method", "authorized", "unauthorized", "seed", "attack", "target", "labels_to_match", "labels_text"]


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


#: the intro of robust.md (``meta["about"]`` replaces it, e.g. for the prompt attacks)
ROBUST_ABOUT = ("Unauthorized test accuracy (%) after each attack (the registry's names). *unprotected*: the unprotected "
                "source model under the same attack and budget; *scratch*: the same architecture trained from random weights "
                "on the same labelled images with the same steps (k-attacks: the k unauthorized images; attacks on a share of "
                "authorized images: that share, labelled; unlabelled attacks: chance); *margin* = protected attacked - "
                "scratch (at or below 0: the protection leaves the attacker no better off than starting over).")


def robust_markdown(long_rows: list[dict], label_rows: list[dict], meta: dict[str, Any]) -> str:
    """robust.md: per method the mean over pairs of each attack (protected, unprotected, scratch,
    margin), the labels-to-match table and the long table (``meta``: seed, ks, steps, n_test and
    optionally the page's ``title`` and ``about`` intro)."""
    import numpy as np

    ks = meta.get("ks", [])
    about = meta.get("about") or ROBUST_ABOUT
    n_test = meta.get("n_test") if meta.get("n_test") is not None else "all"
    lines = [f"# {meta.get('title') or 'Attack suite and honest references'} (seed {meta.get('seed')})", "",
             about + " Steps: " + ", ".join(f"{a} {s}" for a, s in meta.get("steps", {}).items())
             + f"; test images per domain: {n_test}.", ""]
    methods = list(dict.fromkeys(r["method"] for r in long_rows))
    keys = list(dict.fromkeys((r["attack"], r["k"]) for r in long_rows))

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    lines += ["## Mean over pairs", "", "| method | attack | k | protected | unprotected | scratch | margin |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        for a, k in keys:
            rs = [r for r in long_rows if r["method"] == m and r["attack"] == a and r["k"] == k]
            lines.append(f"| {m} | {a} | {'' if k is None else k} | " + " | ".join(
                _fmt(mean([r[c] for r in rs])) for c in ("attacked", "unprotected", "scratch", "margin")) + " |")
    if label_rows:
        lines += ["", f"## Labels to match the unprotected model (k grid {ks}, interpolated in log k)", "",
                  "Labelled unauthorized images the attacker needs, with each fine-tuning strategy, for the attacked protected model "
                  "to reach the unprotected model's unauthorized accuracy (which the unprotected model gives for 0 labels).", "",
                  "| method | authorized | unauthorized | attack | target % | labels |", "|---|---|---|---|---:|---:|"]
        for r in label_rows:
            lines.append(f"| {r['method']} | {r['authorized']} | {r['unauthorized']} | {r['attack']} | {_fmt(r['target'])} | {r['labels_text']} |")
    cols = [("method", "method", 0), ("authorized", "authorized", 0), ("unauthorized", "unauthorized", 0), ("attack", "attack", 0),
            ("k", "k", 0), ("acc_u_protected", "no attack", 1), ("attacked", "protected", 1), ("unprotected", "unprotected", 1),
            ("scratch", "scratch", 1), ("margin", "margin", 1)]
    lines += ["", "## Every pair", "", _markdown([{**r, "k": "" if r["k"] is None else r["k"]} for r in long_rows], cols)]
    return "\n".join(lines) + "\n"


OWNERSHIP_COLUMNS = [("method", "method", 0), ("authorized", "authorized", 0), ("opacity", "grid opacity", 1),
                     ("acc_a_before", "clean before", 1), ("acc_a_after", "clean after", 1), ("drop_a", "Drop_a", 1),
                     ("acc_wm_before", "watermarked, unprotected", 1), ("acc_wm_after", "watermarked, protected", 1),
                     ("seconds", "s", 0), ("seed", "seed", 0)]


class DigitsBench:
    def __init__(self, out: str | Path, config: DigitsBenchConfig, root: str | Path | None = None,
                 log: Callable[[str], None] = print):
        self.out = Path(out)
        self.cfg = config
        self.root = root
        self.log = log
        for m in config.methods:
            if self.base(m) not in classifier_methods():
                raise ConfigError(f"unknown benchmark method '{self.base(m)}'", f"choose among {', '.join(classifier_methods())}")
        if config.robust:
            from ipshield.attacks.robust import check_attacks

            check_attacks(config.robust)
        self.computed: list[str] = []  # cells computed in this call (the rest were reused)
        self._domains = None
        self._sources: dict[str, Any] = {}

    def base(self, method: str) -> str:
        """The registered method a method label runs (itself, or the one ``variants`` names)."""
        return self.cfg.variants.get(method, method)

    # ------------------------------------------------------------------ data and sources
    @property
    def domains(self):
        if self._domains is None:
            needed = list(dict.fromkeys(d for p in self.cfg.pairs for d in p))
            if self.cfg.source == "digits" and not self.cfg.data and all(d in DOMAINS for d in needed):
                from ipshield.data.digits import load_digits

                self._domains = load_digits(tuple(sorted(needed, key=DOMAINS.index)), root=self.root, size=32)
            else:
                from ipshield.data.sources import load_domains

                opts = {"root": self.root, **self.cfg.data}
                self._domains = load_domains(self.cfg.source, needed, **opts)
                missing = [d for d in needed if d not in self._domains]
                if missing:
                    raise ConfigError(f"the data source '{self.cfg.source}' has no domain(s) {missing}",
                                      f"its domains here: {', '.join(self._domains)}")
        return self._domains

    def _order(self, names) -> list[str]:
        order = list(dict.fromkeys(d for p in self.cfg.pairs for d in p))
        return sorted(set(names), key=order.index)

    def source(self, name: str):
        from ipshield.models.classifiers import SourceTrainConfig, load_classifier, train_source

        if name in self._sources:
            return self._sources[name]
        folder = self.out / "sources" / name
        if (folder / "classifier.json").is_file():
            model = load_classifier(folder)
        else:
            t0 = time.time()
            cfg = SourceTrainConfig.build({"arch": self.cfg.arch, "epochs": self.cfg.source_epochs, "n_train": self.cfg.n_train,
                                           "seed": self.cfg.seed})
            model = train_source(self.cfg.arch, self.domains[name], config=cfg, out=folder)
            self.log(f"source {name}: test accuracy {model.train_info['test_accuracy']:.1f}% ({time.time() - t0:.0f}s)")
            self.computed.append(f"source:{name}")
        self._sources[name] = model
        return model

    def pseudo_source(self, name: str):
        import torch

        from ipshield.protect.map import synthesize_pseudo_source
        from ipshield.runs import load_tensors

        path = self.out / "pseudo" / f"{name}.safetensors"
        if path.is_file():
            t = load_tensors(path)
            return t["images"], t["labels"]
        from safetensors.torch import save_file

        cfg = self.method_config("sf-map")
        x, y, info = synthesize_pseudo_source(self.source(name), len(self.domains[name].classes), cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": x.contiguous(), "labels": y.to(torch.int64).contiguous()}, str(path),
                  metadata={"source_agreement": str(info["source_agreement"]), "seconds": str(info["seconds"])})
        self.log(f"pseudo-source {name}: {len(x)} images, source model agrees on {info['source_agreement']:.1f}% ({info['seconds']:.0f}s)")
        self.computed.append(f"pseudo:{name}")
        return x, y

    def method_config(self, method: str):
        from ipshield.registry import METHODS

        c = self.cfg
        base = self.base(method)
        data: dict[str, Any] = {"seed": c.seed, "n_train": c.n_train, "n_test": c.n_test}
        if c.steps is not None:
            data["steps"] = c.steps
        if base.endswith("map"):
            data["n_pseudo"] = c.n_pseudo
            if c.gen_steps is not None:
                data["gen_steps"] = c.gen_steps
        data.update(c.method_options.get(base, {}))
        if method != base:
            data.update(c.method_options.get(method, {}))
        return METHODS.get(base).make_config(data)

    # ------------------------------------------------------------------ cells
    def _drop_if_stale(self, key: str, digest: str, method: str, src: str, tgt: str) -> None:
        """A saved protection cell made with another config (a changed default or option) is removed,
        with the attack cells on its model, so that it is computed again (cells saved before the
        digest was recorded are kept)."""
        path = self.out / "cells" / f"{key}.json"
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text()).get("config_digest")
        except json.JSONDecodeError:
            saved = None
        if saved is None or saved == digest:
            return
        self.log(f"{key}: the method's config changed since this cell was computed; computing it again")
        path.unlink()
        for old in [*(self.out / "cells").glob(f"robust__{_slug(method)}__{src}__{tgt}__*.json"),
                    self.out / "cells" / f"attack__{method}__{src}__{tgt}.json"]:
            old.unlink(missing_ok=True)

    def _cell(self, key: str, fn: Callable[[], dict]) -> dict:
        path = self.out / "cells" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        result["seed"] = self.cfg.seed
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        self.computed.append(key)
        return result

    def protect_cell(self, method: str, src: str, tgt: str) -> dict:
        from ipshield.registry import METHODS

        targets = [tgt]
        base = self.base(method)
        key = f"{method}__{src}__{tgt}"
        if "unauthorized" not in METHODS.get(base).data:  # no unauthorized data: one run per source, evaluated on every target
            targets = self._order(b for a, b in self.cfg.pairs if a == src)
            key = f"{method}__{src}__{'+'.join(targets)}"

        cfg = self.method_config(method)
        digest = _config_digest(cfg)
        self._drop_if_stale(key, digest, method, src, tgt)

        def compute() -> dict:
            from ipshield import jobs

            kw = {}
            if base in ("sf-map", "df-map"):
                kw["pseudo_source"] = self.pseudo_source(src)
            metrics = jobs.protect(base, domains={d: self.domains[d] for d in (src, *targets)}, authorized=src,
                                   unauthorized=targets, out=self.out / "models" / key, model=self.source(src),
                                   config=cfg, options=kw, overwrite=True, verbose=False)
            metrics.pop("history", None)
            return {"cell": key, "model_dir": str(Path("models") / key), "config_digest": digest, **metrics}

        result = self._cell(key, compute)
        s = result["summary"]
        row = {
            "method": method, "authorized": src, "unauthorized": tgt,
            "acc_a_before": s["acc_a_before"], "acc_a_after": s["acc_a_after"],
            "acc_u_before": s["acc_u_before"][tgt], "acc_u_after": s["acc_u_after"][tgt],
            "drop_a": s["drop_a"], "drop_u": s["drop_u"][tgt], "st_d": s["st_d_per_domain"][tgt],
            "sparsity": (result.get("sparsity") or {}).get("overall"), "seconds": result.get("seconds"), "seed": result.get("seed"),
            "model_dir": result["model_dir"],
        }
        if row["sparsity"] is not None:
            row["sparsity"] = 100.0 * row["sparsity"]
        return row

    def ownership_cell(self, method: str, src: str) -> dict:
        """The ownership scenario: ``method`` protects the ``src`` source against its own
        grid-watermarked images (opacity calibrated on the source model)."""
        from ipshield.registry import METHODS

        key = f"ownership__{method}__{src}"

        def compute() -> dict:
            from ipshield import jobs

            cfg = self.method_config(method)
            kw = {"pseudo_source": self.pseudo_source(src)} if self.base(method) in ("sf-map", "df-map") else {}
            metrics = jobs.protect(self.base(method), domains={src: self.domains[src]}, authorized=src, out=self.out / "models" / key,
                                   model=self.source(src), config=cfg, scenario="ownership", options=kw, overwrite=True,
                                   verbose=False)
            metrics.pop("history", None)
            return {"cell": key, "model_dir": str(Path("models") / key), **metrics}

        result = self._cell(key, compute)
        s, wm = result["summary"], result["unauthorized"][0]
        return {"method": method, "authorized": src, "opacity": result["watermark"]["opacity"],
                "acc_a_before": s["acc_a_before"], "acc_a_after": s["acc_a_after"], "drop_a": s["drop_a"],
                "acc_wm_before": s["acc_u_before"][wm], "acc_wm_after": s["acc_u_after"][wm],
                "seconds": result.get("seconds"), "seed": result.get("seed"), "model_dir": result["model_dir"]}

    # ------------------------------------------------------------------ attacks and their references
    def attack_options(self, name: str) -> dict[str, Any]:
        """The config overrides of attack ``name`` in this benchmark: ``attack_steps`` for the
        k-attacks, ``shot_steps`` for SHOT, then ``attack_options[name]``."""
        from ipshield.attacks.robust import uses_k

        opts: dict[str, Any] = {}
        if uses_k(name):
            opts["steps"] = self.cfg.attack_steps
        if name == "shot":
            opts["steps"] = self.cfg.shot_steps
        opts.update(self.cfg.attack_options.get(name, {}))
        return opts

    @property
    def attack_n_test(self) -> int | None:
        return self.cfg.attack_n_test if self.cfg.attack_n_test is not None else self.cfg.n_test

    def suite_attacks(self) -> list[str]:
        """The attacks of the robust table (``robust``), or the classic one's fine-tuning."""
        return list(self.cfg.robust) or ["finetune-direct-all"]

    def _digest(self, *parts: Any) -> str:
        import hashlib

        blob = json.dumps([self.suite_attacks(), {a: self.attack_options(a) for a in self.suite_attacks()},
                           self.attack_n_test, self.cfg.seed, self.cfg.arch, *parts], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]

    def scratch_refs(self, src: str, tgt: str) -> dict[str, Any]:
        """The from-scratch references for the pair (``ipshield.attacks.robust.scratch_grid``): the
        k labelled unauthorized images once per unauthorized domain, the authorized-data ones per pair."""
        from ipshield.attacks.robust import scratch_grid

        if not self.cfg.scratch:
            return {}
        attacks, opts = self.suite_attacks(), {a: self.attack_options(a) for a in self.suite_attacks()}
        ks = list(self.cfg.ks)

        def unauth() -> dict:
            return scratch_grid(self.source(src), self.domains[tgt], None, attacks, ks, opts, self.cfg.seed,
                                self.attack_n_test, which="unauthorized")

        refs = dict(self._cell(f"scratch__{tgt}__{self._digest(ks)}", unauth))
        if any(self._reference_kind(a) == "authorized" for a in attacks):
            def auth() -> dict:
                return scratch_grid(self.source(src), self.domains[tgt], self.domains[src], attacks, ks, opts, self.cfg.seed,
                                    self.attack_n_test, which="authorized")

            refs.update({k: v for k, v in self._cell(f"scratch__{src}__{tgt}__{self._digest()}", auth).items()
                         if k.startswith("scratch_") or k == "chance"})
        return {k: v for k, v in refs.items() if k.startswith("scratch_") or k == "chance"}

    @staticmethod
    def _reference_kind(name: str) -> str:
        from ipshield.attacks.robust import reference_kind

        return reference_kind(name)

    def attack_cell(self, method: str, src: str, tgt: str, model_dir: str | None, acc_u_source: float, acc_u_protected: float) -> dict:
        """The attacks on one model (``model_dir``; None: the unprotected source model) on one pair:
        the classic cost to break (fine-tuning with each k, SHOT) or, with ``robust``, the attack
        suite; with ``scratch``, the from-scratch references and the margins."""
        from ipshield.models.classifiers import load_classifier

        def load():
            return self.source(src) if model_dir is None else load_classifier(self.out / model_dir)

        if self.cfg.robust:
            from ipshield.attacks.robust import attack_grid

            key = f"robust__{_slug(method)}__{src}__{tgt}__{self._digest(list(self.cfg.ks))}"

            def compute() -> dict:
                opts = {a: self.attack_options(a) for a in self.cfg.robust}
                r = attack_grid(load(), self.domains[tgt], self.domains[src], self.cfg.robust, list(self.cfg.ks), opts,
                                self.cfg.seed, self.attack_n_test, log=None)
                return {"cell": key, "method": method, "authorized": src, "unauthorized": tgt, **r}
        else:
            from ipshield.attacks.domain import cost_to_break

            key = f"attack__{method}__{src}__{tgt}"

            def compute() -> dict:
                r = cost_to_break(load(), self.domains[tgt], tuple(self.cfg.ks), shot=True, seed=self.cfg.seed,
                                  n_test=self.cfg.n_test, finetune={"steps": self.cfg.attack_steps},
                                  shot_options={"steps": self.cfg.shot_steps})
                return {"cell": key, **r}

        r = self._cell(key, compute)
        row = {"method": method, "authorized": src, "unauthorized": tgt, "acc_u_source": acc_u_source,
               "acc_u_protected": acc_u_protected, "seconds": r.get("seconds"), "seed": r.get("seed")}
        for k in self.cfg.ks:
            row[f"finetune_k{k}"] = r.get(f"finetune_k{k}", r.get(f"finetune-direct-all_k{k}"))
        row["shot"] = r.get("shot")
        if self.cfg.robust:
            row.update({k: v for k, v in r.items() if k not in row and k not in ("cell", "method", "authorized", "unauthorized")})
        refs = self.scratch_refs(src, tgt)
        row.update(refs)
        for k in self.cfg.ks:
            if row.get(f"finetune_k{k}") is not None and refs.get(f"scratch_k{k}") is not None:
                row[f"margin_k{k}"] = row[f"finetune_k{k}"] - refs[f"scratch_k{k}"]
        row["model_dir"] = model_dir
        if self.cfg.robust:  # inside a suite nobody else writes the robust tables: the last attack cell does
            self.write_robust(only_if_complete=True)
        return row

    def robust_results(self) -> tuple[list[dict], list[dict], list[dict]]:
        """From the finished cells of this configuration: the per-model grid rows, the long rows
        (attack x k with the references and margins) and the labels-to-match rows."""
        from ipshield.attacks.robust import labels_rows, robust_rows

        ks = list(self.cfg.ks)
        digest = self._digest(ks)
        grid_rows, long_rows, label_rows = [], [], []
        for src, tgt in self.cfg.pairs:
            cells = {}
            for method in ["source (unprotected)", *self.cfg.methods]:
                path = self.out / "cells" / f"robust__{_slug(method)}__{src}__{tgt}__{digest}.json"
                if path.is_file():
                    cells[method] = json.loads(path.read_text())
            if not cells:
                continue
            acc = self._pair_accuracy(src, tgt)
            refs = self.scratch_refs(src, tgt) if self.cfg.scratch else {}
            src_grid = cells.get("source (unprotected)")
            # accuracies before the attacks as the attacks measured them (the same test images as the attacked ones)
            acc_source = src_grid.get("acc_before") if src_grid else acc.get("source")
            for method, c in cells.items():
                grid = {**c, "method": method, "authorized": src, "unauthorized": tgt, "seed": c.get("seed"),
                        "acc_u_source": acc_source, "acc_u_protected": c.get("acc_before", acc.get(method))}
                grid.update(refs)
                grid_rows.append(grid)
                long_rows += robust_rows(grid, src_grid, refs, self.cfg.robust, ks)
                label_rows += labels_rows(grid, self.cfg.robust, ks)
        return grid_rows, long_rows, label_rows

    def _pair_accuracy(self, src: str, tgt: str) -> dict[str, Any]:
        """Unauthorized accuracy of the source model and of each finished protection on the pair."""
        from ipshield.registry import METHODS

        out: dict[str, Any] = {}
        for method in self.cfg.methods:
            targets = [tgt]
            key = f"{method}__{src}__{tgt}"
            if "unauthorized" not in METHODS.get(self.base(method)).data:
                targets = self._order(b for a, b in self.cfg.pairs if a == src)
                key = f"{method}__{src}__{'+'.join(targets)}"
            path = self.out / "cells" / f"{key}.json"
            if path.is_file():
                s = json.loads(path.read_text())["summary"]
                out[method] = s["acc_u_after"][tgt]
                out.setdefault("source", s["acc_u_before"][tgt])
        out["source (unprotected)"] = out.get("source")
        return out

    def write_robust(self, only_if_complete: bool = False) -> Path | None:
        """robust.csv, robust-labels.csv, robust.md and robust.json (robust.html is the report layer's; when the report layer is
        there) in the benchmark folder, and in the suite folder when this benchmark runs inside
        one (``<suite>/shared/digits-s<seed>``). ``only_if_complete``: only once every protected
        model of the configuration has its attack cell."""
        grid_rows, long_rows, label_rows = self.robust_results()
        done = {(r["method"], r["authorized"], r["unauthorized"]) for r in grid_rows}
        if only_if_complete and not all((m, a, u) in done for a, u in self.cfg.pairs for m in self.cfg.methods):
            return None
        if not long_rows:
            return None
        meta = {"seed": self.cfg.seed, "ks": list(self.cfg.ks), "attacks": list(self.cfg.robust),
                "steps": {a: self.attack_options(a).get("steps") for a in self.cfg.robust}, "n_test": self.attack_n_test}
        folders = [self.out]
        if self.out.parent.name == "shared" and self.out.name.startswith("digits-s"):
            folders.append(self.out.parent.parent)
        path = None
        for folder in folders:
            _write_csv(folder / "robust.csv", long_rows, ROBUST_COLUMNS)
            _write_csv(folder / "robust-labels.csv", label_rows, LABEL_COLUMNS)
            (folder / "robust.md").write_text(robust_markdown(long_rows, label_rows, meta))
            write_json(folder / "robust.json", {"meta": meta, "grid": grid_rows, "rows": long_rows, "labels": label_rows})
            path = folder / "robust.json"  # robust.html: the report layer (``report.html.write_report``) draws it
        return path

    # ------------------------------------------------------------------ the whole benchmark
    def run(self) -> dict[str, Any]:
        from ipshield.runs import RunDir

        t0 = time.time()
        run = RunDir(self.out, kind="bench-digits", config=self.cfg, seed=self.cfg.seed)
        rows, attack_rows = [], []
        for src, tgt in self.cfg.pairs:
            for method in self.cfg.methods:
                row = self.protect_cell(method, src, tgt)
                rows.append(row)
                self.log(f"{method} {src}->{tgt}: Acc_a {row['acc_a_before']:.1f}->{row['acc_a_after']:.1f}, "
                         f"Acc_u {row['acc_u_before']:.1f}->{row['acc_u_after']:.1f}")
        if self.cfg.attacks:
            for src, tgt in self.cfg.pairs:
                pair_rows = [r for r in rows if r["authorized"] == src and r["unauthorized"] == tgt]
                if self.cfg.attack_source and pair_rows:
                    before = pair_rows[0]["acc_u_before"]
                    attack_rows.append(self.attack_cell("source (unprotected)", src, tgt, None, before, before))
                for r in pair_rows:
                    attack_rows.append(self.attack_cell(r["method"], src, tgt, r["model_dir"], r["acc_u_before"], r["acc_u_after"]))
                    self.log(f"attacks on {r['method']} {src}->{tgt}: " + ", ".join(
                        f"{k}={_fmt(v)}" for k, v in attack_rows[-1].items() if k.startswith(("finetune_k", "shot"))))
        own_rows = []
        if self.cfg.ownership:
            for src in dict.fromkeys(a for a, _ in self.cfg.pairs):
                for method in (m for m in self.cfg.methods if m != "ntl-tf"):
                    r = self.ownership_cell(method, src)
                    own_rows.append(r)
                    self.log(f"ownership {method} {src}: watermarked {r['acc_wm_before']:.1f}->{r['acc_wm_after']:.1f}, "
                             f"clean {r['acc_a_before']:.1f}->{r['acc_a_after']:.1f} (opacity {r['opacity']})")
        self.write_tables(rows, attack_rows, own_rows)
        if self.cfg.robust and attack_rows:
            self.write_robust()
        seconds = round(time.time() - t0, 1)
        run.save_metrics({"rows": rows, "attacks": attack_rows, "ownership": own_rows, "computed": self.computed,
                          "seconds_this_call": seconds, "summary": summarize_targets(rows)}, "metrics.json")
        run.finish(seconds_this_call=seconds)
        return {"rows": rows, "attacks": attack_rows, "ownership": own_rows, "computed": self.computed, "seconds": seconds}

    def write_tables(self, rows: list[dict], attack_rows: list[dict], own_rows: Sequence[dict] = ()) -> None:
        _write_csv(self.out / "results.csv", rows, [c[0] for c in RESULT_COLUMNS])
        md = [f"# Digits benchmark (seed {self.cfg.seed})\n", _markdown(rows, RESULT_COLUMNS)]
        md.append("\nAccuracies in percent on balanced test subsets; Drop in points; ST-D = Drop_a / Drop_u (n/a when Drop_u <= 0).\n")
        summary = summarize_targets(rows)
        if summary:
            md.append("\n## Means per method\n\n" + _markdown(summary, [("method", "method", 0), ("acc_a_drop_max", "max Drop_a", 1),
                                                                         ("drop_a_mean", "mean Drop_a", 2), ("acc_u_after_max", "max Acc_u after", 1),
                                                                         ("acc_u_after_mean", "mean Acc_u after", 1), ("st_d_mean", "mean ST-D", 4)]))
        (self.out / "results.md").write_text("".join(md))
        if attack_rows:
            cols = ATTACK_COLUMNS_BASE + [(f"finetune_k{k}", f"fine-tune k={k}", 1) for k in self.cfg.ks] + [("shot", "SHOT", 1)]
            if any(r.get(f"scratch_k{k}") is not None for r in attack_rows for k in self.cfg.ks):
                cols += [(f"scratch_k{k}", f"from scratch k={k}", 1) for k in self.cfg.ks]
                cols += [(f"margin_k{k}", f"margin k={k}", 1) for k in self.cfg.ks]
            cols += [("seed", "seed", 0)]
            _write_csv(self.out / "attacks.csv", attack_rows, [c[0] for c in cols])
            (self.out / "attacks.md").write_text(
                f"# Cost to break (seed {self.cfg.seed})\n\nUnauthorized test accuracy (percent) after each attack on the protected model: "
                f"fine-tuning all weights with k labelled unauthorized images ({self.cfg.attack_steps} steps), SHOT-style "
                f"source-free adaptation ({self.cfg.shot_steps} steps, no labels). From scratch: the same architecture trained from "
                f"random weights on the same k images with the same steps; margin = fine-tuned protected - from scratch (at or "
                f"below 0: the protection leaves the attacker no better off than starting over).\n\n" + _markdown(attack_rows, cols))
        if own_rows:
            _write_csv(self.out / "ownership.csv", list(own_rows), [c[0] for c in OWNERSHIP_COLUMNS])
            (self.out / "ownership.md").write_text(
                f"# Ownership verification (seed {self.cfg.seed})\n\nThe unauthorized domain is the authorized test set with "
                "the grid watermark, at the opacity where the unprotected source model keeps 90 % of its accuracy "
                "(calibrated on training images). Evidence of ownership: the unprotected model still reads the watermarked "
                "images, the protected one collapses on them while keeping its clean accuracy. SF/DF-MAP learn it from "
                "the watermarked pseudo-source (no real image).\n\n" + _markdown(list(own_rows), OWNERSHIP_COLUMNS))


def summarize_targets(rows: list[dict]) -> list[dict]:
    import numpy as np

    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        std = [r["st_d"] for r in rs if r["st_d"] is not None]
        out.append({"method": m, "acc_a_drop_max": max(r["drop_a"] for r in rs), "drop_a_mean": float(np.mean([r["drop_a"] for r in rs])),
                    "acc_u_after_max": max(r["acc_u_after"] for r in rs), "acc_u_after_mean": float(np.mean([r["acc_u_after"] for r in rs])),
                    "st_d_mean": float(np.mean(std)) if std else None})
    return out


def run_digits_bench(out: str | Path, config: DigitsBenchConfig | None = None, root: str | Path | None = None,
                     pairs: Sequence[tuple[str, str]] | None = None, methods: Sequence[str] | None = None,
                     seed: int | None = None, smoke: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the digits benchmark into ``out``; returns the rows and the cells computed now."""
    kw: dict[str, Any] = {}
    if pairs is not None:
        kw["pairs"] = list(pairs)
    if methods is not None:
        kw["methods"] = list(methods)
    if seed is not None:
        kw["seed"] = seed
    if config is None:
        config = DigitsBenchConfig.smoke(**kw) if smoke else DigitsBenchConfig.build(kw)
    return DigitsBench(out, config, root=root, log=log).run()
