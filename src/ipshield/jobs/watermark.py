"""The watermark workflows behind the CLIs (same names in the Python API): ``apply_watermark``,
``run_extract``, ``run_verify``, ``run_calibrate``. Each writes a run folder (``runs.open_run``: a
finished run is refused unless ``overwrite``; ``runs.run_guard`` marks it ``failed`` or
``interrupted`` with the reason when the job does not finish) with ``metrics.json`` and PNG plots.
Nothing secret (key, matrices, triggers, pairings) is written to a run folder other than the
watermark folder itself (``apply_watermark``'s ``out``: mode 700, its secret files mode 600).
Bad inputs (config keys, customers, too few innocents, unreadable key or model) are refused before
the run folder is opened."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ipshield.errors import IPShieldError
from ipshield.runs import open_run, private_dir, run_guard


def apply_watermark(model: str | Path, key: str | Path, out: str | Path, scheme: str = "vlpmarker",
                    customers: Sequence[str] = ("customer-0",), overrides: list[str] | None = None,
                    n_reference: int = 600, reference_seed: int = 1, eval_domains: bool = True,
                    overwrite: bool = False) -> dict:
    """Fit the watermark of ``model`` with the master key file ``key`` and write it to ``out`` (the
    owner's watermark folder, plus a report: trigger selection, per-customer refinement monitor,
    zero-shot accuracy before/after). ``scheme``: any entry of ``WATERMARKS``; ``overrides``:
    ``key=value`` of its config (dotted keys for the stacked scheme: ``vlpmarker.steps=100``).
    A folder holding a finished watermark is refused unless ``overwrite`` (the old watermark, and
    the evidence it gives, would be lost)."""
    from ipshield.models.clip import load_clip
    from ipshield.registry import WATERMARKS
    from ipshield.watermark.base import CleanEncoder, reference_from_synthetic, write_watermark_json, read_watermark_json, zero_shot_accuracy
    from ipshield.watermark.keys import MasterKey

    spec = WATERMARKS.get(scheme)
    scheme = spec.name
    cfg = spec.make_config({}, overrides)
    customers = list(customers)
    if not customers:
        raise IPShieldError("no customers to report on", "pass --customers a,b,c (customer ids)")
    adapter = load_clip(model)
    mk = MasterKey.load(key, dim=int(adapter.embed_dim))
    p = Path(out)
    if not p.exists():
        private_dir(p)  # created private: never readable by others, not even for a moment
    run = open_run(p, f"watermark-{scheme}", cfg, None, overwrite)
    os.chmod(run.path, 0o700)
    with run_guard(run):
        ref = reference_from_synthetic(n_reference, seed=reference_seed)
        wm = spec.obj.fit(adapter, mk, ref, cfg)
        wm.save(run.path)
        info = read_watermark_json(run.path)
        info["model"] = str(Path(model).resolve())
        info["customers"] = customers
        write_watermark_json(run.path, {k: v for k, v in info.items() if k != "format"})
        metrics: dict = {"method": scheme, "dim": wm.dim, "key_id": mk.key_id, "customers": customers,
                         "selection": getattr(wm, "selection", {})}
        if hasattr(wm, "refinement_report"):
            metrics["refinement"] = {c: wm.refinement_report(c)["final"] for c in customers}
        if eval_domains:
            from ipshield.data.synthetic import load_synthetic

            doms = load_synthetic(n_train=200, n_test=500, seed=0)
            before = zero_shot_accuracy(CleanEncoder(adapter), doms)
            after = {c: zero_shot_accuracy(wm.encoder(adapter, c), doms) for c in customers}
            metrics["accuracy"] = {"before": before, "after": after[customers[0]]}
            metrics["zero_shot_change"] = {c: {d: after[c][d] - before[d] for d in before} for c in customers}
            metrics["max_abs_zero_shot_change"] = max(abs(v) for c in customers for v in metrics["zero_shot_change"][c].values())
        run.save_metrics(metrics)
    run.finish()
    return metrics


def run_extract(model: str | Path, key: str | Path, watermark: str | Path, customer: str, out: str | Path,
                n_queries: int = 6000, overrides: list[str] | None = None, public_seed: int = 5,
                overwrite: bool = False) -> dict:
    """Simulate the thief (the ``wm-extract`` attack): query the watermarked service of ``customer``
    with public synthetic image-caption pairs and train a student (saved as a CLIP folder in
    ``out/student``)."""
    from ipshield.attacks.watermark import ExtractConfig
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.registry import ATTACKS
    from ipshield.watermark.base import CleanEncoder, load_watermark, reference_from_synthetic, zero_shot_accuracy

    spec = ATTACKS.get("wm-extract")
    cfg = ExtractConfig.build({"n_queries": n_queries}, overrides)
    adapter = load_clip(model)
    wm = load_watermark(watermark, key)
    service = wm.encoder(adapter, customer)
    run = open_run(out, f"attack-{spec.name}", cfg, cfg.seed, overwrite)
    with run_guard(run):
        public = reference_from_synthetic(cfg.n_queries, seed=public_seed, split="train")
        res = spec.run(service, cfg, public=public, arch_dir=model, out_dir=run.path / "student", verbose=True)
        student = res.pop("model")
        info = {k: v for k, v in res.items() if k not in ("attack", "n_queries")}
        doms = load_synthetic(n_train=200, n_test=500, seed=0)
        metrics = {"method": spec.name, "customer": customer, "extraction": info,
                   "accuracy": {"service": zero_shot_accuracy(service, doms),
                                "student": zero_shot_accuracy(CleanEncoder(student), doms)}}
        run.save_metrics(metrics)
    run.finish(student=str(run.path / "student"))
    return metrics


def plot_report(report, path: str | Path) -> Path | None:
    """Histograms of the test and control cosines of each test of a verification report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [t for t in report.tests.values() if getattr(t, "test_values", None) is not None]
    if not tests:
        return None
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 3.2))
    axes = [axes] if len(tests) == 1 else list(axes)
    for ax, t in zip(axes, tests):
        ax.hist(t.control_values, bins=40, density=True, alpha=0.55, label="control")
        ax.hist(t.test_values, bins=40, density=True, alpha=0.55, label="test")
        ax.set_title(f"{t.name}: p={t.p_value:.2g}, KS p={t.ks_p:.2g}", fontsize=9)
        ax.set_xlabel("cosine")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.suspect}: {report.verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def run_verify(suspect_model: str | Path, key: str | Path, watermark: str | Path, out: str | Path,
               customer: str | None = None, identify: bool = False, customers: Sequence[str] | None = None,
               clean_model: str | Path | None = None, max_queries: int = 512, alpha: float = 1e-6,
               n_probes: int = 512, probe_seed: int = 9, overwrite: bool = False) -> dict:
    """Verify a local suspect CLIP folder (or any embedder, e.g. ``serve.client.HTTPSuspect``)
    against a watermark; writes report + plots to ``out``."""
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import load_watermark, read_watermark_json, reference_from_synthetic
    from ipshield.watermark.verify import as_suspect, identify_customer, verify

    info = read_watermark_json(watermark)
    ids: list[str] = []
    if identify:
        ids = list(customers or info.get("customers") or [])
        if not ids:
            raise IPShieldError("no customers to identify among", "pass --customers a,b,c or apply the watermark with --customers")
    elif customer is None:
        raise IPShieldError("which customer's watermark should be verified?", "pass --customer ID, or --identify")
    wm = load_watermark(watermark, key)
    clean_path = clean_model or info.get("model")
    if not clean_path:
        raise IPShieldError("the watermark folder does not name the clean model", "pass --clean-model DIR")
    clean = load_clip(clean_path)
    suspect = as_suspect(suspect_model)  # a CLIP folder, or any embedder (e.g. serve.client.HTTPSuspect)
    cal = info.get("calibration")
    run = open_run(out, "verify", {"suspect": str(suspect_model), "watermark": str(watermark), "customer": customer,
                                   "identify": identify, "max_queries": max_queries, "alpha": alpha}, None, overwrite)
    with run_guard(run):
        probes = reference_from_synthetic(n_probes, seed=probe_seed)
        if identify:
            report = identify_customer(wm, suspect, clean, probes, ids, max_queries=max_queries, alpha=alpha, calibration=cal)
        else:
            report = verify(wm, suspect, clean, probes, customer, max_queries=max_queries, alpha=alpha, calibration=cal)
        plot_report(report, run.path / "cosines.png")
        metrics = {"method": f"verify-{wm.scheme}", **report.to_dict()}
        run.save_metrics(metrics)
        (run.path / "report.txt").write_text(report.summary() + "\n")
    run.finish(verdict=report.verdict)
    return metrics


def run_calibrate(innocents: Sequence[str | Path], key: str | Path, watermark: str | Path, out: str | Path,
                  customers: Sequence[str] | None = None, clean_model: str | Path | None = None,
                  max_queries: int = 512, alpha: float = 1e-6, n_probes: int = 512, probe_seed: int = 9,
                  min_innocent: int = 5, write: bool = True, overwrite: bool = False) -> dict:
    """Calibrate the decision on innocent models (CLIP folders the owner knows were not derived from
    the service: independently trained models). Each innocent is verified against every customer;
    the Procrustes statistic's mean/sd and the decision threshold (``calibrate``) are written into
    the watermark folder's ``watermark.json`` (``calibration``), which ``ipshield verify`` then uses.
    The run folder gets the false-positive count and every innocent's p-values (leave-one-out: each
    innocent judged with a calibration fit on the others)."""
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import load_watermark, read_watermark_json, reference_from_synthetic, write_watermark_json
    from ipshield.watermark.verify import calibrate, recalibrate, run_tests

    innocents = [Path(p) for p in innocents]
    if len(innocents) < max(2, min_innocent):
        raise IPShieldError(f"{len(innocents)} innocent model(s) given; the calibration needs at least {max(2, min_innocent)}",
                            "pass more --innocent DIR (independently trained CLIPs with the service's embedding size)")
    info = read_watermark_json(watermark)
    wm = load_watermark(watermark, key)
    ids = list(customers or info.get("customers") or [])
    if not ids:
        raise IPShieldError("no customers to calibrate for", "pass --customers a,b,c or apply the watermark with --customers")
    clean_path = clean_model or info.get("model")
    if not clean_path:
        raise IPShieldError("the watermark folder does not name the clean model", "pass --clean-model DIR")
    clean = load_clip(clean_path)
    run = open_run(out, "watermark-calibrate", {"innocents": [str(p) for p in innocents], "watermark": str(watermark),
                                                "customers": ids, "max_queries": max_queries, "alpha": alpha}, None, overwrite)
    with run_guard(run):
        probes = reference_from_synthetic(n_probes, seed=probe_seed)
        per_model = []
        for path in innocents:
            reps = run_tests(wm, path, clean, probes, ids, max_queries, alpha, None, "inconclusive")
            per_model.append(reps)

        def fit(models: list[list]) -> dict:
            # the Procrustes statistic does not depend on the customer: one report per model for its
            # mean/sd; the threshold from every (model, customer) p-value
            c = calibrate([reps[0] for reps in models], alpha=alpha, min_innocent=min(min_innocent, len(models)))
            c["threshold"] = calibrate([r for reps in models for r in reps], alpha=alpha)["threshold"]
            return c

        cal = fit(per_model)
        rows, false_pos = [], 0
        for i, (path, reps) in enumerate(zip(innocents, per_model)):
            loo = fit([rr for j, rr in enumerate(per_model) if j != i])
            judged = [recalibrate(r, loo) for r in reps]
            flagged = [r.customer_id for r in judged if r.verdict == "stolen"]
            false_pos += bool(flagged)
            rows.append({"innocent": str(path), "flagged_for": flagged,
                         "p_values": {r.customer_id: r.p_value for r in judged},
                         "procrustes_mean_cos": reps[0].tests["procrustes"].test_mean_cos if "procrustes" in reps[0].tests else None})
        metrics = {"method": f"calibrate-{wm.scheme}", "calibration": cal, "n_innocent": len(innocents),
                   "false_positives": false_pos, "false_positive_rate": false_pos / len(innocents), "innocents": rows}
        if write:
            write_watermark_json(Path(watermark), {**{k: v for k, v in info.items() if k != "format"}, "calibration": cal})
        run.save_metrics(metrics)
    run.finish(false_positive_rate=metrics["false_positive_rate"])
    return metrics
