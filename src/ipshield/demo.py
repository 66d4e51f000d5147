"""The main job on the embedded default (``make demo`` / ``ipshield demo``).

1. make the synthetic domains and write a sample grid;
2. pretrain the small CLIP (or reuse the cached one);
3. zero-shot CLIP and CoOp (unprotected) and IP-CLIP (restricted to the authorized domain, every
   other built-in domain unauthorized), evaluated on every domain;
4. print a per-domain accuracy table; write metrics.json and a bar chart into the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out: str | Path, authorized: str = "clean", preset: str = "default", seed: int = 0,
             ipclip_epochs: int = 30, ipclip_lr: float = 0.005) -> dict:
    from ipshield.data.preview import preview_grid
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip
    from ipshield.protect.base import accuracy_by_domain
    from ipshield.protect.coop import CoOpConfig, train_coop
    from ipshield.protect.ipclip import IPCLIPConfig, train_ipclip
    from ipshield.protect.zeroshot import ZeroShotClassifier
    from ipshield.report.plots import accuracy_bars
    from ipshield.report.tables import markdown_accuracy_table, print_accuracy_table
    from ipshield.runs import RunDir

    console = Console()
    timings: dict[str, float] = {}
    run = RunDir(out, "demo", {"authorized": authorized, "preset": preset, "seed": seed}, seed=seed)

    t = time.perf_counter()
    domains = load_synthetic(seed=seed)
    if authorized not in domains:
        from ipshield.errors import IPShieldError

        raise IPShieldError(f"unknown authorized domain '{authorized}'", f"choose one of: {', '.join(domains)}")
    preview_grid(domains, run.file("samples.png"))
    timings["data"] = time.perf_counter() - t
    console.print(f"[bold]data[/]: {len(domains)} domains x {len(next(iter(domains.values())).train)} train images "
                  f"({timings['data']:.1f} s) -> {run.file('samples.png')}")

    t = time.perf_counter()
    clip_dir = small_clip(preset)
    adapter = load_clip(clip_dir)
    timings["small_clip"] = time.perf_counter() - t
    console.print(f"[bold]small CLIP[/]: {clip_dir} ({timings['small_clip']:.1f} s)")

    classes = next(iter(domains.values())).classes
    acc: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    acc["zero-shot"] = accuracy_by_domain(ZeroShotClassifier(adapter, classes), domains)
    timings["zero_shot"] = time.perf_counter() - t

    t = time.perf_counter()
    coop = train_coop(adapter, domains[authorized], CoOpConfig(seed=seed))
    acc["CoOp"] = accuracy_by_domain(coop, domains)
    coop.save(run.path / "coop")
    timings["coop"] = time.perf_counter() - t

    # IP-CLIP: restrict the small CLIP to the authorized domain (target-specified: every other
    # built-in domain is a labelled unauthorized domain)
    t = time.perf_counter()
    others = [domains[d] for d in domains if d != authorized]
    ipclip = train_ipclip(adapter, domains[authorized], others,
                          IPCLIPConfig(epochs=ipclip_epochs, max_train=500, augment=False, lr=ipclip_lr, seed=seed))
    acc["IP-CLIP"] = accuracy_by_domain(ipclip, domains)
    ipclip.save(run.path / "ip-clip")
    timings["ip_clip"] = time.perf_counter() - t

    print_accuracy_table(acc, authorized, f"accuracy (%) per domain, authorized = {authorized}")
    accuracy_bars(acc, run.file("accuracy.png"), f"accuracy per domain (authorized: {authorized})",
                  authorized=authorized, chance=100.0 / len(classes))
    (run.path / "accuracy.md").write_text(markdown_accuracy_table(acc, authorized))
    from ipshield.metrics import summarize_restriction

    metrics = {
        "authorized": authorized,
        "summary": {"ip-clip vs zero-shot": summarize_restriction(acc["zero-shot"], acc["IP-CLIP"], authorized, len(classes)),
                    "ip-clip vs coop": summarize_restriction(acc["CoOp"], acc["IP-CLIP"], authorized, len(classes))},
        "unauthorized": [d for d in domains if d != authorized],
        "n_classes": len(classes),
        "accuracy": acc,
        "timings_s": timings,
    }
    run.save_metrics(metrics)
    run.finish()
    console.print(f"run folder: {run.path}  (metrics.json, accuracy.png, samples.png)")
    return metrics
