"""Watermark benchmark on the small CLIP: VLPMarker vs EmbMarker (``ipshield bench watermark``).

What it measures (everything [ours]: the papers' setups are unknown):

1. utility: zero-shot accuracy of every synthetic domain, clean vs served (each customer);
2. extraction: students trained on the service's embeddings of public synthetic pairs, at several
   query budgets; each verified with at most ``max_queries`` queries;
3. innocent models: independently pretrained small CLIPs (other seeds, other pretraining data,
   short pretrainings, cached) verified the same way; the Procrustes test is calibrated
   leave-one-out on them (each innocent is judged with a calibration fit on the others), which
   gives the false-positive rate at the decision threshold and the p-value distribution;
4. attacks on the main student: rotation, permutation, Gaussian noise, dimension removal, pruning,
   fine-tuning; p-value and the thief's zero-shot accuracy against strength (PNG curves);
5. identification of the leaking customer among ``n_customers``.

Output folder: ``parts/*.json`` (finished steps; a rerun resumes), ``innocent/`` and ``students/``
(CLIP folders), ``metrics.json``, ``results.md``, ``*.png``. The owner's key and watermark folders
are in ``owner/`` (mode 700): delete it when sharing the results.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ipshield.config import BaseConfig
from ipshield.runs import write_json
from ipshield.registry import SUITES


#: the schemes the benchmark knows, in table order
SCHEMES = ("vlpmarker", "embmarker", "vlpmarker+embmarker")


class WatermarkBenchConfig(BaseConfig):
    seed: int = 0
    #: None: the cached small CLIP (``small_clip("default")``); a number: the default preset
    #: pretrained for that many steps (cached), for machines where the full pretraining is too long
    teacher_steps: int | None = None
    n_customers: int = 6
    thief_customer: str = "customer-3"
    #: extraction budgets (public pairs; each pair is two queries); the last one is the main student
    budgets: list[int] = [1500, 6000]
    extract_epochs: int = 8
    max_queries: int = 512
    alpha: float = 1e-6
    n_probes: int = 512
    #: innocent models: short pretrainings of the small CLIP's architecture
    n_innocent: int = 10
    innocent_steps: int = 600
    #: the first ones have the service's architecture; the others a narrower one (same embedding size)
    innocent_same_arch: int = 2
    #: attack strengths
    noise_levels: list[float] = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
    dim_removal: list[int] = [1, 2, 4, 8, 16, 32]
    prune_levels: list[float] = [0.1, 0.3, 0.5, 0.7, 0.8]
    finetune_steps: list[int] = [30, 100]
    n_eval_test: int = 300
    schemes: list[str] = list(SCHEMES)
    vlpmarker_overrides: list[str] = []

    @classmethod
    def smoke(cls) -> "WatermarkBenchConfig":
        return cls(n_customers=5, budgets=[600], extract_epochs=2, n_innocent=3, innocent_steps=30,
                   noise_levels=[0.5], dim_removal=[2], prune_levels=[0.3], finetune_steps=[10], n_eval_test=60,
                   n_probes=128, max_queries=256)


def teacher_path(config: WatermarkBenchConfig) -> Path:
    """The service's model: the cached small CLIP, or a shorter pretraining of its preset."""
    from ipshield.models.tiny_clip import preset_config, pretrain, small_clip
    from ipshield.utils import cache_dir

    if config.teacher_steps is None:
        return small_clip("default")
    d = cache_dir() / "watermark_bench" / f"teacher-{config.teacher_steps}"
    if not (d / "model.safetensors").is_file() or not (d / "pretrain.json").is_file():
        pretrain(preset_config("default", [f"steps={config.teacher_steps}"]), d, show_progress=False)
    return d


def _file_name(scheme: str) -> str:
    return scheme.replace("+", "-")


def _identification_budget(wm, max_queries: int) -> int:
    """Identification sends every trigger pair of a VLPMarker layer (each customer's pairs must
    fall among the queried ones), plus the scheme's own extra queries."""
    if getattr(wm, "signature_template", None) is None:
        return max_queries
    return 4 * wm.n_triggers + int(getattr(wm, "extra_queries", 0) or 0)


#: the tests in the tables' p-value columns (``-``: the test does not apply to the scheme)
_P_TESTS = ("trigger", "distribution", "covariance", "permutation", "cluster", "procrustes")
_P_HEAD = " | ".join(f"p {t}" for t in _P_TESTS)


def _p_cols(p: dict) -> str:
    return " | ".join(_fmt_p(p.get(t)) for t in _P_TESTS)


def _customer_means(per_customer: dict[str, dict]) -> dict[str, float]:
    """The mean over customers of every numeric field of per-customer records."""
    rows = list(per_customer.values())
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else []
    return {k: float(np.mean([r.get(k, float("nan")) for r in rows])) for k in keys}


def _customer_p(row: dict) -> Any:
    """A ranking row's p-value from the customer-specific tests (the combined one in older runs)."""
    return row.get("p_customer", row.get("p_value"))


def _fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and p != p):
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


class WatermarkBench:
    def __init__(self, out: str | Path, config: WatermarkBenchConfig, model: str | Path | None = None,
                 log: Callable[[str], None] = print):
        self.out = Path(out)
        self.cfg = config
        self.log = log
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "parts").mkdir(exist_ok=True)
        if model is None:
            model = teacher_path(config)
        self.model_path = Path(model)
        self._cache: dict[str, Any] = {}
        write_json(self.out / "config.json", {"config": config.to_dict(), "model": str(self.model_path)})

    # -------------------------------------------------------------- helpers
    def part(self, name: str, fn: Callable[[], dict]) -> dict:
        p = self.out / "parts" / f"{name}.json"
        if p.is_file():
            return json.loads(p.read_text())
        t0 = time.time()
        res = fn()
        res["seconds"] = round(time.time() - t0, 1)
        write_json(p, res)
        self.log(f"[bench watermark] {name}: {res['seconds']:.0f}s")
        return json.loads(p.read_text())

    @property
    def adapter(self):
        if "adapter" not in self._cache:
            from ipshield.models.clip import load_clip

            self._cache["adapter"] = load_clip(self.model_path)
        return self._cache["adapter"]

    @property
    def domains(self):
        if "domains" not in self._cache:
            from ipshield.data.synthetic import load_synthetic

            self._cache["domains"] = load_synthetic(n_train=200, n_test=self.cfg.n_eval_test, seed=0)
        return self._cache["domains"]

    @property
    def probes(self):
        if "probes" not in self._cache:
            from ipshield.watermark.base import reference_from_synthetic

            self._cache["probes"] = reference_from_synthetic(self.cfg.n_probes, seed=9)
        return self._cache["probes"]

    @property
    def public(self):
        if "public" not in self._cache:
            from ipshield.watermark.base import reference_from_synthetic

            self._cache["public"] = reference_from_synthetic(max(self.cfg.budgets), seed=5, split="train")
        return self._cache["public"]

    def zs(self, embedder) -> dict[str, float]:
        from ipshield.watermark.base import zero_shot_accuracy

        return zero_shot_accuracy(embedder, self.domains)

    @property
    def customers(self) -> list[str]:
        ids = [f"customer-{i}" for i in range(self.cfg.n_customers)]
        if self.cfg.thief_customer not in ids:
            ids[-1] = self.cfg.thief_customer
        return ids

    def owner(self):
        """(key, {scheme: watermark}); the key and watermark folders live in out/owner (mode 700)."""
        if "owner" in self._cache:
            return self._cache["owner"]
        from ipshield.watermark.base import load_watermark, reference_from_synthetic
        from ipshield.watermark.embmarker import EmbMarker, EmbMarkerConfig
        from ipshield.watermark.keys import MasterKey
        from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig

        od = self.out / "owner"
        od.mkdir(exist_ok=True)
        os.chmod(od, 0o700)
        kp = od / "key.json"
        key = MasterKey.load(kp) if kp.is_file() else MasterKey.generate(int(self.adapter.embed_dim))
        if not kp.is_file():
            key.save(kp)
        wms = {}
        ref = reference_from_synthetic(600, seed=1)
        from ipshield.watermark.stacked import StackedConfig, StackedMarker

        vcfg = VLPMarkerConfig.build({}, self.cfg.vlpmarker_overrides)
        for scheme, cls, cfg in (("vlpmarker", VLPMarker, vcfg), ("embmarker", EmbMarker, EmbMarkerConfig()),
                                 ("vlpmarker+embmarker", StackedMarker, StackedConfig(vlpmarker=vcfg))):
            if scheme not in self.cfg.schemes:
                continue
            folder = od / scheme
            if (folder / "watermark.json").is_file():
                wms[scheme] = load_watermark(folder, key)
            else:
                wms[scheme] = cls.fit(self.adapter, key, ref, cfg)
                wms[scheme].save(folder)
        self._cache["owner"] = (key, wms)
        return self._cache["owner"]

    def clean(self):
        from ipshield.watermark.base import CleanEncoder

        return CleanEncoder(self.adapter)

    def verify(self, scheme: str, suspect, customer: str | None = None, name: str = "suspect", calibration=None):
        from ipshield.watermark.verify import Suspect, verify

        _, wms = self.owner()
        s = Suspect.from_embedder(suspect, name=name)
        return verify(wms[scheme], s, self.clean(), self.probes, customer or self.cfg.thief_customer,
                      max_queries=self.cfg.max_queries, alpha=self.cfg.alpha, calibration=calibration)

    # -------------------------------------------------------------- steps
    def utility(self, scheme: str) -> dict:
        _, wms = self.owner()
        wm = wms[scheme]
        before = self.zs(self.clean())
        served = {c: wm.encoder(self.adapter, c) for c in self.customers}
        after = {c: self.zs(enc) for c, enc in served.items()}
        res: dict[str, Any] = {"before": before, "after": after,
                               "max_abs_change": max(abs(a[d] - before[d]) for a in after.values() for d in before),
                               "similarity": {c: self.similarity_change(enc) for c, enc in served.items()}}
        if hasattr(wm, "refinement_report"):
            res["refinement"] = {c: wm.refinement_report(c)["final"] for c in self.customers}
            res["clean_trigger_gap"] = wm.refinement_report(self.customers[0])["clean_trigger_gap"]
            res["selection"] = wm.selection
        else:
            res["selection"] = wm.selection
        return res

    def similarity_change(self, served) -> dict[str, float]:
        """How the service's image-caption similarities move under the watermark, end to end, on 600
        held-out synthetic pairs (not the probes): mean |cosine change| and top-1 retrieval
        agreement with the clean model, image -> caption and caption -> image (%)."""
        from ipshield.watermark.base import reference_from_synthetic

        if "similarity_ref" not in self._cache:
            ref = reference_from_synthetic(600, seed=11)
            clean = self.clean()
            self._cache["similarity_ref"] = (ref, clean.embed_images(ref.images) @ clean.embed_texts(ref.texts).T)
        ref, base = self._cache["similarity_ref"]
        sim = served.embed_images(ref.images) @ served.embed_texts(ref.texts).T

        def agree(dim: int) -> float:
            return float((sim.argmax(dim) == base.argmax(dim)).double().mean() * 100)

        return {"mean_abs_cos_change": float((sim - base).abs().mean()), "top1_image_to_caption": agree(1),
                "top1_caption_to_image": agree(0), "n_pairs": int(len(ref.texts))}

    def student_dir(self, scheme: str, budget: int) -> Path:
        return self.out / "students" / f"{scheme}-{budget}"

    def student(self, scheme: str, budget: int):
        from ipshield.attacks.watermark import ExtractConfig, extract_student, query_service
        from ipshield.models.clip import load_clip

        d = self.student_dir(scheme, budget)
        if (d / "model.safetensors").is_file():
            return load_clip(d), json.loads((d / "extract.json").read_text())
        _, wms = self.owner()
        key = f"targets-{scheme}"
        if key not in self._cache:
            service = wms[scheme].encoder(self.adapter, self.cfg.thief_customer)
            self._cache[key] = query_service(service, self.public, max(self.cfg.budgets))
        cfg = ExtractConfig(n_queries=budget, epochs=self.cfg.extract_epochs, seed=self.cfg.seed)
        student, info = extract_student(None, self.public, self.model_path, cfg, out_dir=d, targets=self._cache[key])
        (d / "extract.json").write_text(json.dumps(info))
        return load_clip(d), info

    def extraction(self, scheme: str) -> dict:
        from ipshield.watermark.base import CleanEncoder

        rows = []
        for b in self.cfg.budgets:
            st, info = self.student(scheme, b)
            rep = self.verify(scheme, CleanEncoder(st), name=f"student-{b}")
            rows.append({"budget_pairs": b, "queries_spent_by_thief": info["queries"], "zero_shot": self.zs(CleanEncoder(st)),
                         "report": rep.to_dict()})
        return {"rows": rows}

    def innocent_dir(self, i: int) -> Path:
        from ipshield.utils import cache_dir

        return cache_dir() / "watermark_bench" / f"innocent-{self.cfg.innocent_steps}-{i}"

    def innocent(self, i: int):
        """Innocent model i: the small CLIP's architecture pretrained briefly with another seed;
        odd i also on other data (other synthetic seed, synthetic styles only)."""
        from ipshield.models.clip import load_clip
        from ipshield.models.tiny_clip import PretrainConfig, pretrain

        d = self.innocent_dir(i)
        if not (d / "model.safetensors").is_file():
            if (self.model_path / "pretrain.json").is_file():
                base = json.loads((self.model_path / "pretrain.json").read_text())["config"]
            else:
                from ipshield.models.tiny_clip import preset_config

                base = preset_config("default").to_dict()
            base = {k: v for k, v in base.items() if k in PretrainConfig.model_fields}
            base.update({"steps": self.cfg.innocent_steps, "seed": 1000 + i, "warmup_steps": min(50, self.cfg.innocent_steps // 5)})
            if i >= self.cfg.innocent_same_arch:
                base.update({"vision_width": 64, "vision_layers": 2, "text_width": 64, "text_layers": 1,
                             "n_per_domain": 600, "eval_n_test": 100})
            if i % 2 == 1:
                base.update({"data_seed": 500 + i, "include_digits": False})
            pretrain(PretrainConfig.build(base), d, show_progress=False)
        return load_clip(d)

    def innocents(self, scheme: str) -> dict:
        from ipshield.watermark.base import CleanEncoder

        rows = []
        for i in range(self.cfg.n_innocent):
            m = self.innocent(i)
            rep = self.verify(scheme, CleanEncoder(m), name=f"innocent-{i}")
            rows.append({"innocent": i, "zero_shot": self.zs(CleanEncoder(m)), "report": rep.to_dict()})
        return {"rows": rows}

    def attacks(self, scheme: str, calibration: dict) -> dict:
        from ipshield.attacks.watermark import dim_removal, finetune, noise, permute, prune, rotate
        from ipshield.watermark.base import CleanEncoder

        st, _ = self.student(scheme, max(self.cfg.budgets))
        base = CleanEncoder(st)
        dim = int(st.embed_dim)
        public = self.public.split(1000, 1000)
        rows = []

        def add(attack: str, strength, emb) -> None:
            rep = self.verify(scheme, emb, name=f"{attack}-{strength}", calibration=calibration)
            zs = self.zs(emb)
            rows.append({"attack": attack, "strength": strength, "zero_shot_mean": float(np.mean(list(zs.values()))),
                         "p_value": rep.p_value, "verdict": rep.verdict,
                         "p": {k: t.p_value for k, t in rep.tests.items()}})

        add("none", 0, base)
        add("wm-rotate", 1, rotate(base, dim=dim))
        add("wm-permute", 1, permute(base, dim=dim))
        add("wm-signed-permute", 1, permute(base, dim=dim, signs=True))
        for s in self.cfg.noise_levels:
            add("wm-noise", s, noise(base, s))
        for k in self.cfg.dim_removal:
            add("wm-dim-removal", k, dim_removal(base, k, public=public))
        for a in self.cfg.prune_levels:
            add("wm-prune", a, CleanEncoder(prune(st, a)))
        for n in self.cfg.finetune_steps:
            add("wm-finetune", n, CleanEncoder(finetune(st, n, public=public)))
        return {"rows": rows}

    def identification(self, scheme: str) -> dict:
        from ipshield.watermark.base import CleanEncoder
        from ipshield.watermark.verify import Suspect, identify_customer

        _, wms = self.owner()
        st, _ = self.student(scheme, max(self.cfg.budgets))
        out = {}
        for name, emb in (("student", CleanEncoder(st)),):
            rep = identify_customer(wms[scheme], Suspect.from_embedder(emb, name=name), self.clean(), self.probes,
                                    self.customers, max_queries=_identification_budget(wms[scheme], self.cfg.max_queries),
                                    alpha=self.cfg.alpha)
            out[name] = {"true": self.cfg.thief_customer, "identified": rep.customer_id, "verdict": rep.verdict,
                         "p_value": rep.p_value, "ranking": rep.ranking, "queries": rep.queries}
        return out

    # -------------------------------------------------------------- run
    def run(self) -> dict:
        from ipshield.watermark.verify import VerificationReport, calibrate, recalibrate

        t0 = time.time()
        schemes = list(self.cfg.schemes)
        res: dict[str, Any] = {"config": self.cfg.to_dict(), "model": str(self.model_path)}
        res["utility"] = {}
        for scheme in schemes:
            res["utility"][scheme] = self.part(f"utility-{scheme}", lambda: self.utility(scheme))
            ext = self.part(f"extraction-{scheme}", lambda: self.extraction(scheme))
            inn = self.part(f"innocents-{scheme}", lambda: self.innocents(scheme))
            reports = [_report_from_dict(r["report"]) for r in inn["rows"]]
            cal_all = calibrate(reports, self.cfg.alpha)
            loo = []
            for i, r in enumerate(reports):
                cal_i = calibrate(reports[:i] + reports[i + 1:], self.cfg.alpha)
                loo.append(recalibrate(r, cal_i))
            students = [recalibrate(_report_from_dict(r["report"]), cal_all) for r in ext["rows"]]
            att = self.part(f"attacks-{scheme}", lambda: self.attacks(scheme, cal_all))
            ident = self.part(f"identify-{scheme}", lambda: self.identification(scheme))
            res[scheme] = {
                "calibration": cal_all,
                "extraction": [{**{k: v for k, v in row.items() if k != "report"}, "verdict": s.verdict, "p_value": s.p_value,
                                "p": {k: t.p_value for k, t in s.tests.items()}, "queries": s.queries,
                                "tests": {k: t.to_dict() for k, t in s.tests.items()}}
                               for row, s in zip(ext["rows"], students)],
                "innocents": [{"innocent": row["innocent"], "zero_shot_mean": float(np.mean(list(row["zero_shot"].values()))),
                               "verdict": r.verdict, "p_value": r.p_value, "p": {k: t.p_value for k, t in r.tests.items()}}
                              for row, r in zip(inn["rows"], loo)],
                "false_positive_rate": float(np.mean([r.verdict == "stolen" for r in loo])) if loo else None,
                "attacks": att["rows"],
                "identification": ident,
            }
        res["seconds"] = round(time.time() - t0, 1)
        write_json(self.out / "metrics.json", res)
        self.plots(res)
        (self.out / "results.md").write_text(results_markdown(res))
        return res

    def plots(self, res: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for scheme in (s for s in SCHEMES if s in res):
            rows = res[scheme]["attacks"]
            base_acc = next((r["zero_shot_mean"] for r in rows if r["attack"] == "none"), None)
            kinds = [k for k in ("wm-noise", "wm-dim-removal", "wm-prune") if any(r["attack"] == k for r in rows)]
            fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.4))
            axes = [axes] if len(kinds) == 1 else list(axes)
            for ax, kind in zip(axes, kinds):
                rr = [r for r in rows if r["attack"] == kind]
                xs = [r["strength"] for r in rr]
                ps = [max(r["p_value"], 1e-300) if r["p_value"] is not None else 1.0 for r in rr]
                ax.plot(xs, [-np.log10(p) for p in ps], "o-", color="C0", label="-log10 p (combined)")
                ax.axhline(-np.log10(self.cfg.alpha), color="C0", ls=":", lw=1)
                ax.set_xlabel(kind + (" (noise norm)" if kind == "wm-noise" else " (directions)" if kind == "wm-dim-removal" else " (fraction)"))
                ax.set_ylabel("-log10 p", color="C0")
                ax2 = ax.twinx()
                ax2.plot(xs, [r["zero_shot_mean"] for r in rr], "s--", color="C1", label="thief zero-shot")
                if base_acc is not None:
                    ax2.axhline(base_acc - 5, color="C1", ls=":", lw=1)
                ax2.set_ylabel("thief zero-shot %", color="C1")
                ax.set_title(f"{scheme}: {kind}", fontsize=9)
            fig.tight_layout()
            fig.savefig(self.out / f"attacks-{_file_name(scheme)}.png", dpi=110)
            plt.close(fig)
        # p-value distribution: innocents vs students
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for i, scheme in enumerate(s for s in SCHEMES if s in res):
            inn = [max(r["p_value"], 1e-300) for r in res[scheme]["innocents"] if r["p_value"] is not None]
            stu = [max(r["p_value"], 1e-300) for r in res[scheme]["extraction"] if r["p_value"] is not None]
            ax.scatter(-np.log10(inn), [i + 0.1] * len(inn), marker="o", label=f"{scheme} innocent")
            ax.scatter(-np.log10(stu), [i - 0.1] * len(stu), marker="x", label=f"{scheme} student")
        ax.axvline(-np.log10(self.cfg.alpha), color="k", ls=":", lw=1)
        ax.set_xscale("symlog")
        ax.set_xlabel("-log10 combined p-value")
        ax.set_yticks([])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.out / "pvalues.png", dpi=110)
        plt.close(fig)


def _report_from_dict(d: dict):
    from ipshield.watermark.verify import TestResult, VerificationReport

    tests = {k: TestResult(**v) for k, v in (d.get("tests") or {}).items()}
    fields = {k: d[k] for k in ("scheme", "customer_id", "verdict", "p_value", "threshold")}
    return VerificationReport(**fields, tests=tests, queries=d.get("queries", {}), reasons=d.get("reasons", []),
                              ranking=d.get("ranking", []), suspect=d.get("suspect", "suspect"))


def results_markdown(res: dict) -> str:
    lines = ["# Watermark benchmark", "", f"model: `{res['model']}`", "", "## Utility (zero-shot %, clean vs served)", ""]
    for scheme, u in res["utility"].items():
        doms = list(u["before"])
        lines.append(f"### {scheme}")
        lines.append("")
        lines.append("| | " + " | ".join(doms) + " |")
        lines.append("|---|" + "---|" * len(doms))
        lines.append("| clean | " + " | ".join(f"{u['before'][d]:.1f}" for d in doms) + " |")
        for c, acc in u["after"].items():
            lines.append(f"| served to {c} | " + " | ".join(f"{acc[d]:.1f}" for d in doms) + " |")
        lines.append("")
        lines.append(f"max |change| over all customers and domains: {u['max_abs_change']:.2f} points")
        if "similarity" in u:
            sim = _customer_means(u["similarity"])
            lines.append(f"image-caption similarities on {sim['n_pairs']:.0f} held-out pairs (mean over customers): "
                         f"|cos change| {sim['mean_abs_cos_change']:.4f}, top-1 agreement with the clean model "
                         f"{sim['top1_image_to_caption']:.1f} % image -> caption, {sim['top1_caption_to_image']:.1f} % caption -> image")
        if "refinement" in u:
            ref = _customer_means(u["refinement"])
            lines.append(f"refinement (mean over customers): orthogonality error {ref['orthogonality_error']:.3f}, "
                         f"served trigger gap {ref['trigger_gap']:.4f} (z {ref['trigger_z']:.1f}; "
                         f"clean {u['clean_trigger_gap']:.4f}), reference image-caption |cos change| "
                         f"{ref.get('utility_mean_abs_cos_change', float('nan')):.4f}")
        lines.append("")
    for scheme in (s for s in SCHEMES if s in res):
        r = res[scheme]
        lines += ["", f"## {scheme}", "", "### Extraction (students), verification with at most "
                  f"{res['config']['max_queries']} queries", "",
                  "| budget (pairs) | thief zero-shot mean | verdict | p (combined) | " + _P_HEAD + " | queries |",
                  "|---|---|---|---|" + "---|" * len(_P_TESTS) + "---|"]
        for row in r["extraction"]:
            zs = np.mean(list(row["zero_shot"].values()))
            p = row["p"]
            lines.append(f"| {row['budget_pairs']} | {zs:.1f} | {row['verdict']} | {_fmt_p(row['p_value'])} | "
                         f"{_p_cols(p)} | {row['queries'].get('total')} |")
        lines += ["", f"### Innocent models (leave-one-out calibration): false-positive rate {r['false_positive_rate']:.2f} "
                  f"over {len(r['innocents'])}", "",
                  "| innocent | zero-shot mean | verdict | p (combined) | " + _P_HEAD + " |", "|---|---|---|---|" + "---|" * len(_P_TESTS)]
        for row in r["innocents"]:
            p = row["p"]
            lines.append(f"| {row['innocent']} | {row['zero_shot_mean']:.1f} | {row['verdict']} | {_fmt_p(row['p_value'])} | "
                         f"{_p_cols(p)} |")
        lines += ["", "### Attacks on the main student", "", "| attack | strength | thief zero-shot mean | verdict | p (combined) | " + _P_HEAD + " |",
                  "|---|---|---|---|---|" + "---|" * len(_P_TESTS)]
        for row in r["attacks"]:
            p = row["p"]
            lines.append(f"| {row['attack']} | {row['strength']} | {row['zero_shot_mean']:.1f} | {row['verdict']} | {_fmt_p(row['p_value'])} | "
                         f"{_p_cols(p)} |")
        ident = r["identification"].get("student", {})
        rk = ident.get("ranking", [])
        top = _customer_p(rk[0]) if rk else None
        lines += ["", f"### Identification among {len(rk)} customers", "",
                  f"true {ident.get('true')}, identified {ident.get('identified')} ({ident.get('verdict')}, p={_fmt_p(ident.get('p_value'))}, "
                  f"{ident.get('queries', {}).get('total')} queries); on the customer-specific tests alone: p="
                  f"{_fmt_p(min(1.0, top * len(rk)) if top is not None else None)} for the identified customer "
                  f"(Bonferroni over {len(rk)}), runner-up p={_fmt_p(_customer_p(rk[1])) if len(rk) > 1 else '-'}"]
    return "\n".join(lines) + "\n"


@SUITES.register("watermark", description="every watermark scheme against the extraction attack and its variants")
def run_watermark_bench(out: str | Path, config: WatermarkBenchConfig | None = None, model: str | Path | None = None,
                        log: Callable[[str], None] = print) -> dict:
    return WatermarkBench(out, config or WatermarkBenchConfig(), model, log).run()
