"""Run folders of IP-CLIP and NTL-prompt: train, evaluate the unprotected references (zero-shot
and CoOp) and the protected model on every domain, write ``metrics.json`` (CONTRACTS schema) and
the learned prompt; reload a run on any domain; predict a folder of images; the ablation table.

Which test sets count as authorized / unauthorized per scenario ([ours], see docs/ipclip.md):

- target-specified: authorized = the clean authorized test set; ``summary`` over the unauthorized
  domains trained against, ``summary_unseen`` over every other domain (never seen in training);
- ownership: authorized = the clean authorized test set, unauthorized = the same test images with
  the grid watermark ("<domain>+watermark"); other domains are reported, not summarised;
- target-free: authorized = the clean authorized test set; ``summary`` over every other domain
  (all never seen);
- authorization: authorized = the watermarked authorized test set, unauthorized = the clean
  authorized test set and every other domain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.errors import CheckpointError, DataError, IPShieldError
from ipshield.registry import METHODS
from ipshield.protect.ipclip import (GENERATOR_META, HEAD_META, IPCLIP, IPCLIPConfig, SwitchableIPCLIP,
                                     WATERMARK_SUFFIX, accuracy_on_sets, evaluation_sets, load_head, read_generator_meta,
                                     train_ipclip, verdict_on_sets)
from ipshield.protect.ipclip.verdict import NO_HEAD_NOTE

#: what `evaluate` and `predict` can reload, by run kind
RUN_KINDS = ("ip-clip", "ntl-prompt")


def check_domains(domains: dict[str, Domain], authorized: str, unauthorized: Sequence[str]) -> list[str]:
    """Clear errors for the user's mistakes; returns the shared class names."""
    if authorized not in domains:
        raise DataError(f"authorized domain '{authorized}' is not among {sorted(domains)}", "pick one of those")
    for u in unauthorized:
        if u == authorized:
            raise DataError(f"domain '{u}' is given as both authorized and unauthorized",
                            "name a different unauthorized domain (or use --scenario target-free / ownership)")
        if u not in domains:
            raise DataError(f"unauthorized domain '{u}' is not among {sorted(domains)}", "pick one of those")
    return check_same_classes([domains[authorized], *[domains[u] for u in unauthorized],
                               *[d for n, d in domains.items() if n != authorized and n not in unauthorized]])


def summary_groups(scenario: str, domains: dict[str, Domain], authorized: str, unauthorized: Sequence[str]
                   ) -> tuple[str, list[str], list[str]]:
    """(authorized test-set name, unauthorized set names summarised, never-seen set names)."""
    others = [d for d in domains if d != authorized and d not in unauthorized]
    if scenario == "target-specified":
        return authorized, list(unauthorized), others
    if scenario == "ownership":
        return authorized, [authorized + WATERMARK_SUFFIX], []
    if scenario == "target-free":
        return authorized, others, others
    return authorized + WATERMARK_SUFFIX, [authorized, *others], []


def reference_accuracies(adapter, domains: dict[str, Domain], authorized: str, sets: dict, coop_config=None,
                         with_coop: bool = True, verbose: bool = True, coop=None) -> dict[str, dict[str, float]]:
    """Accuracy of the unprotected references on every test set: zero-shot CLIP and CoOp
    (``coop``, or one trained on the authorized domain's clean train split)."""
    from ipshield.protect.zeroshot import ZeroShotClassifier

    refs = {"zero-shot": accuracy_on_sets(ZeroShotClassifier(adapter, domains[authorized].classes), sets, adapter)}
    if with_coop:
        if coop is None:
            from ipshield.protect.coop import CoOpConfig, train_coop

            coop = train_coop(adapter, domains[authorized], coop_config or CoOpConfig(), verbose=verbose)
        refs["coop"] = accuracy_on_sets(coop, sets, adapter)
    return refs


def build_metrics(method: str, scenario: str, domains: dict[str, Domain], authorized: str, unauthorized: Sequence[str],
                  refs: dict[str, dict[str, float]], after: dict[str, float], **extra) -> dict:
    from ipshield.metrics import summarize_restriction

    n_classes = len(domains[authorized].classes)
    auth_set, unauth_sets, unseen = summary_groups(scenario, domains, authorized, unauthorized)
    reference = "coop" if "coop" in refs else "zero-shot"
    before = refs[reference]
    metrics = {
        "method": method,
        "scenario": scenario,
        "authorized": auth_set,
        "unauthorized": unauth_sets,
        "n_classes": n_classes,
        "accuracy": {"before": before, "after": after},
        "reference": reference,
        "references": refs,
        "summary": summarize_restriction(before, after, auth_set, n_classes, unauth_sets),
    }
    if unseen and unseen != unauth_sets:
        metrics["unseen"] = unseen
        metrics["summary_unseen"] = summarize_restriction(before, after, auth_set, n_classes, unseen)
    if "coop" in refs and "zero-shot" in refs:
        metrics["summary_vs_zero_shot"] = summarize_restriction(refs["zero-shot"], after, auth_set, n_classes,
                                                                unauth_sets)
    metrics.update(extra)
    return metrics


def prompt_job(kind: str, job, config, train: Callable) -> dict:
    """The job of a prompt method (IP-CLIP, NTL-prompt): references (zero-shot and, unless
    ``job.options["with_coop"]`` is False, CoOp: the trained one in ``job.options["coop"]`` or one
    trained with ``job.options["coop_config"]``), training, evaluation on every test set of the
    scenario; the learned prompt is saved into ``job.out``."""
    adapter, domains, authorized = job.model, job.domains, job.authorized
    unauthorized = list(job.unauthorized)
    check_domains(domains, authorized, unauthorized)
    if config.scenario == "target-specified" and not unauthorized:
        raise DataError("the target-specified scenario needs at least one unauthorized domain",
                        "give --unauthorized D2 (or use --scenario target-free)")
    train_u = unauthorized if config.scenario == "target-specified" else []
    stride = getattr(config, "watermark_stride", 2)
    _auth_set, sets = evaluation_sets(domains, authorized, config.scenario, stride)
    t0 = time.perf_counter()
    refs = reference_accuracies(adapter, domains, authorized, sets, job.options.get("coop_config"),
                                job.options.get("with_coop", True), job.verbose, coop=job.options.get("coop"))
    t_refs = time.perf_counter() - t0
    model = train(adapter, domains[authorized], [domains[u] for u in train_u], config, verbose=job.verbose)
    after = accuracy_on_sets(model, sets, adapter)
    extra: dict = {"train_unauthorized": train_u, "history": model.history}
    head = getattr(model, "head", None)
    if head is None and kind != "ip-clip":  # [ours] the verdict of the other prompt methods, when cheap
        head = fit_prompt_head(adapter, domains[authorized], [domains[u] for u in train_u], config)
        model.head = head
    if kind == "ip-clip":
        selection = getattr(model, "selection", None)
        if job.out is not None:
            model.save(job.out, extra={"authorized": authorized, "unauthorized_train": train_u, "selection": selection})
        extra.update(timing={**model.timing, "references_s": t_refs}, selection=selection)
    elif job.out is not None:
        model.save(job.out)
    if head is not None:
        if job.out is not None:
            head.save(job.out)
        # [ours] the verdict on every test set (AUROC / TAR / FAR at the saved threshold)
        extra["verdict"] = {**head.summary(), "test": verdict_on_sets(head, sets, adapter)}
    else:
        extra["verdict"] = {"available": False, "note": "no authorization head: verdict=false, or too few training "
                                                        "images to fit one (at least 4 per set; for ntl-prompt / coop, "
                                                        "20 outside the training subset: lower max_train)"}
    job.options["trained_model"] = model  # for callers that go on with it (the benchmark's embedding map)
    return build_metrics(kind, config.scenario, domains, authorized, train_u, refs, after, **extra)


def fit_prompt_head(adapter, authorized: Domain, unauthorized: Sequence[Domain], config):
    """[ours] The verdict for a prompt method other than IP-CLIP (NTL-prompt, CoOp): fitted on
    held-out training images outside the method's ``max_train`` subset (its training is not
    changed); None when fewer than ``verdict_min`` are spare."""
    from ipshield.protect.ipclip import build_streams_with_validation
    from ipshield.protect.ipclip.train import fit_verdict
    from ipshield.protect.ipclip.verdict import spare_images

    scenario = getattr(config, "scenario", "target-specified")
    cfg = IPCLIPConfig(scenario=scenario, max_train=getattr(config, "max_train", None), seed=getattr(config, "seed", 0),
                       watermark_stride=getattr(config, "watermark_stride", 2), amp=False, device="cpu")
    splits = [authorized.train] + ([d.train for d in unauthorized] if scenario == "target-specified" else [])
    spare = spare_images([len(x) for x in splits], cfg.max_train, cfg.seed)
    if spare < cfg.verdict_min:
        return None
    val_size = min(cfg.verdict_size, spare)
    _, _, val_a, val_u = build_streams_with_validation(authorized, unauthorized, scenario, cfg.max_train, cfg.seed,
                                                       size=adapter.image_size, watermark_stride=cfg.watermark_stride,
                                                       val_size=val_size, val_fraction=cfg.val_fraction)
    return fit_verdict(adapter, authorized, unauthorized, cfg, val_a, val_u, val_size)


@METHODS.register("ip-clip", config=IPCLIPConfig, model="clip", data=("authorized", "unauthorized"),
                  scenarios=("target-specified", "ownership", "target-free", "authorization"),
                  description="IP-CLIP: a learned IP prompt generator restricts a frozen CLIP to the authorized domain")
def ipclip_job(job, config: IPCLIPConfig) -> dict:
    """Train IP-CLIP, evaluate references and the protected model on every test set; the prompt
    generator goes to ``prompt_generator.safetensors`` + ``prompt_generator.json``."""
    return prompt_job("ip-clip", job, config.check(), train_ipclip)


# ---------------------------------------------------------------------------- reload
def run_kind(run: str | Path) -> str:
    run = Path(run)
    if not run.is_dir():
        raise IPShieldError(f"run folder {run} does not exist", "give the --out folder of `ipshield protect ip-clip`")
    if (run / GENERATOR_META).is_file():
        return "ip-clip"
    if (run / "prompt.json").is_file():
        meta = json.loads((run / "prompt.json").read_text())
        return "ntl-prompt" if (run / "run.json").is_file() and _run_info(run).get("kind") == "ntl-prompt" \
            else meta.get("method", "coop")
    raise CheckpointError(f"{run} holds no learned prompt ({GENERATOR_META} or prompt.json)",
                          "give a run folder written by `ipshield protect ip-clip`, `ntl-prompt` or `coop`")


def _run_info(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def saved_model_path(run: str | Path) -> str | None:
    """The CLIP checkpoint a run was trained on, when it was recorded."""
    run = Path(run)
    if (run / GENERATOR_META).is_file() and read_generator_meta(run).get("model_path"):
        return read_generator_meta(run).get("model_path")
    try:  # any CLIP method's run folder records it in run.json (written by the jobs layer)
        return json.loads((run / "run.json").read_text()).get("model_path")
    except (OSError, ValueError, AttributeError):
        return None


def load_run(run: str | Path, adapter, authorize: Sequence[str] | None = None):
    """The protected (or reference) prompt model of a run folder on ``adapter``, ready to predict.
    ``model.head`` is its authorization head ([ours]; None for a run saved without one).
    ``authorize``: the authorized domains at deployment (a switchable run; others accept only
    their own authorized domain)."""
    kind = run_kind(run)
    if kind == "ip-clip":
        meta = read_generator_meta(run)
        if meta.get("switchable") or meta.get("config", {}).get("switchable"):
            model = SwitchableIPCLIP.load(run, adapter)
            if authorize:
                model.authorize(authorize)
            return model
        model = IPCLIP.load(run, adapter)
    else:
        from ipshield.protect.coop import CoOpModel

        model = CoOpModel.load(run, adapter).eval()
    model.head = load_head(run)
    if authorize:
        if model.head is None:
            raise DataError(f"--authorize needs a run trained with switchable=true; {run} has no authorization head",
                            "train with `ipshield protect ip-clip ... --set switchable=true`")
        model.head.check_authorized(authorize)  # a clear error unless it is the run's own authorized set
    return model


def verdict_note(run: str | Path) -> str:
    """Why a run has no verdict (for the CLI and the JSON output)."""
    return NO_HEAD_NOTE.format(file=f"no {HEAD_META} in {run}")


def run_scenario(run: str | Path) -> tuple[str, str | None]:
    """(scenario, authorized domain) recorded in a run folder."""
    run = Path(run)
    m = {}
    if (run / "metrics.json").is_file():
        m = json.loads((run / "metrics.json").read_text())
    meta = read_generator_meta(run) if (run / GENERATOR_META).is_file() else {}
    scenario = m.get("scenario") or meta.get("config", {}).get("scenario", "target-specified")
    return scenario, meta.get("authorized") or (m.get("authorized") or "").replace(WATERMARK_SUFFIX, "") or None


def _test_sets(run: str | Path, model, domains: dict[str, Domain]) -> dict:
    classes = getattr(model, "classes", None)
    for name, d in domains.items():
        if classes is not None and list(d.classes) != list(classes):
            fix = "evaluate on domains with the run's classes, in the same order"
            if len(d.classes) == len(classes):  # the same classes under other names (e.g. numeral folders)
                fix += (" (or rename them: --class-names "
                        + ",".join(f"{a}={b}" for a, b in zip(d.classes, classes) if a != b) + ")")
            raise DataError(f"domain '{name}' has classes {d.classes[:5]}... but the run was trained on {classes[:5]}...",
                            fix)
    scenario, _ = run_scenario(run)
    sets = {n: (d.test, None) for n, d in domains.items()}
    if scenario in ("ownership", "authorization"):
        from ipshield.protect.ipclip import watermark_fn

        stride = getattr(getattr(model, "config", None), "watermark_stride", 2)
        sets.update({n + WATERMARK_SUFFIX: (d.test, watermark_fn(stride)) for n, d in domains.items()})
    return sets


def evaluate_run(run: str | Path, adapter, domains: dict[str, Domain], authorize: Sequence[str] | None = None
                 ) -> dict[str, float]:
    """Accuracy (percent) of a saved run on every given domain (and, for the watermark
    scenarios, on each domain's watermarked test set). ``authorize``: see ``load_run``."""
    model = load_run(run, adapter, authorize)
    return accuracy_on_sets(model, _test_sets(run, model, domains), adapter)


def evaluate_run_report(run: str | Path, adapter, domains: dict[str, Domain], authorize: Sequence[str] | None = None,
                        reference: dict[str, Domain] | None = None) -> dict:
    """{"accuracy": per test set, "verdict": [ours] per test set the share accepted at the saved
    threshold, the AUROC against the authorized test set, TAR and FAR}. ``reference``: domains
    whose test sets serve as the authorized test set when it is not among ``domains``."""
    model = load_run(run, adapter, authorize)
    sets = _test_sets(run, model, domains)
    acc = accuracy_on_sets(model, sets, adapter)
    head = getattr(model, "head", None)
    if head is None:
        return {"accuracy": acc, "verdict": {"available": False, "note": verdict_note(run)}}
    ref = _test_sets(run, model, {n: d for n, d in (reference or {}).items() if n not in domains})
    auth = getattr(model, "authorized_set", None) or head.check_authorized(authorize)
    return {"accuracy": acc, "verdict": verdict_on_sets(head, sets, adapter, auth, ref)}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def predict_folder(run: str | Path, folder: str | Path, adapter, batch_size: int = 64,
                   authorize: Sequence[str] | None = None) -> list[dict]:
    """Predicted class (and its probability) of every image file under ``folder``, with [ours]
    the authorization verdict ("authorized" / "unauthorized", or "unavailable" for a run without
    a head) and its score (score - threshold: >= 0 is authorized; None when unavailable)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist", "give a folder of image files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}", "give a folder of images")
    model = load_run(run, adapter, authorize)
    head = getattr(model, "head", None)
    auth = (getattr(model, "authorized_set", None) or head.check_authorized(authorize)) if head is not None else None
    split = ImageSplit(files, np.zeros(len(files), dtype=np.int64))
    rows = []
    for s in range(0, len(files), batch_size):
        part = split.subset(range(s, min(len(files), s + batch_size)))
        try:
            x = part.to_tensor(adapter.image_size)
        except Exception as exc:  # an unreadable image
            raise DataError(f"could not read the images {files[s]}..{files[min(len(files), s + batch_size) - 1]}: {exc}",
                            "remove or re-save the broken files") from None
        with torch.no_grad():
            prob = model.predict_logits(x.to(adapter.device)).float().softmax(-1).cpu()
        conf, pred = prob.max(-1)
        margin = None
        if head is not None:
            from ipshield.protect.ipclip.evaluate import verdict_margins

            margin = verdict_margins(head, part, adapter, authorized=auth, batch_size=batch_size)
        for i in range(len(part)):
            rows.append({"file": str(files[s + i]), "class": model.classes[int(pred[i])], "index": int(pred[i]),
                         "probability": float(conf[i]),
                         "verdict": ("unavailable" if margin is None else
                                     "authorized" if margin[i] >= 0 else "unauthorized"),
                         "score": None if margin is None else float(margin[i])})
    return rows


# ---------------------------------------------------------------------------- ablation
#: name -> config overrides; what each component contributes, on the same data
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no style tokens": {"style_tokens": False},
    "no content tokens": {"content_tokens": False},
    "no image conditioning": {"style_tokens": False, "content_tokens": False},
    "no banks/branch": {"branch": False},
    "branch frozen (reference)": {"branch_trainable": False},
    "no L_u": {"w_u": 0.0},
    "no L_self": {"w_self": 0.0},
    "no L_cross": {"w_cross": 0.0},
    "no L_dom": {"w_dom": 0.0},
    "no L_ent": {"w_ent": 0.0},
    "no L_kl": {"w_kl": 0.0},
}


def ablation(adapter, domains: dict[str, Domain], authorized: str, unauthorized: Sequence[str],
             config: IPCLIPConfig | None = None, variants: Sequence[str] | None = None, with_coop: bool = True,
             coop_config=None, verbose: bool = True, on_row: Callable[[dict], None] | None = None) -> dict:
    """Train IP-CLIP once per variant of ``ABLATIONS`` on the same data and seed; returns
    {"references": ..., "rows": [{variant, accuracy per set, summary metrics}]}."""
    config = (config or IPCLIPConfig()).check()
    unauthorized = list(unauthorized)
    check_domains(domains, authorized, unauthorized)
    names = list(variants) if variants else list(ABLATIONS)
    unknown = [v for v in names if v not in ABLATIONS]
    if unknown:
        raise IPShieldError(f"unknown ablation variant(s) {unknown}", f"choose from: {', '.join(ABLATIONS)}")
    train_u = unauthorized if config.scenario == "target-specified" else []
    auth_set, sets = evaluation_sets(domains, authorized, config.scenario, config.watermark_stride)
    refs = reference_accuracies(adapter, domains, authorized, sets, coop_config, with_coop, verbose)
    rows = []
    for name in names:
        cfg = IPCLIPConfig.build({**config.to_dict(), **ABLATIONS[name]})
        t0 = time.perf_counter()
        model = train_ipclip(adapter, domains[authorized], [domains[u] for u in train_u], cfg, verbose=verbose)
        after = accuracy_on_sets(model, sets, adapter)
        m = build_metrics("ip-clip", cfg.scenario, domains, authorized, train_u, refs, after)
        row = {"variant": name, "overrides": ABLATIONS[name], "accuracy": after, "summary": m["summary"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    auth_set, unauth_sets, _ = summary_groups(config.scenario, domains, authorized, train_u)
    return {"scenario": config.scenario, "authorized": auth_set, "unauthorized": unauth_sets, "references": refs,
            "rows": rows, "config": config.to_dict()}


def ablation_markdown(result: dict) -> str:
    sets = list(result["rows"][0]["accuracy"]) if result["rows"] else []
    head = "| variant | " + " | ".join(sets) + " | gap | chance-norm. | balanced |"
    lines = [head, "|---|" + "---:|" * (len(sets) + 3)]
    for name, acc in result["references"].items():
        lines.append(f"| {name} (unprotected) | " + " | ".join(f"{acc[s]:.1f}" for s in sets) + " | | | |")
    for r in result["rows"]:
        s = r["summary"]
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r['accuracy'][k]:.1f}" for k in sets)
                     + f" | {s.get('gap', float('nan')):.1f} | {s.get('chance_normalised', float('nan')):.2f}"
                     + f" | {s.get('balanced_score', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
