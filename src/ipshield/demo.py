"""The main job on the embedded default (``make demo`` / ``ipshield demo``).

1. make the synthetic domains and write a sample grid;
2. pretrain the small CLIP (or reuse the cached one);
3. zero-shot CLIP and CoOp (unprotected) and IP-CLIP (restricted to the authorized domain, every
   other built-in domain unauthorized), evaluated on every domain;
4. print a per-domain accuracy table; write metrics.json and a bar chart into the run folder;
5. watermark the small CLIP's embedding service (VLPMarker), steal it (a student trained on the
   service's answers), and verify the thief, the thief's rotated copy and an innocent model
   (an independently pretrained small CLIP): a verdict table, ``watermark.md`` and metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out: str | Path, authorized: str = "clean", preset: str = "default", seed: int = 0,
             ipclip_epochs: int = 30, ipclip_lr: float = 0.005, watermark: bool = True, steal_pairs: int = 6000,
             steal_epochs: int = 12, innocent_steps: int | None = None) -> dict:
    from ipshield.data.preview import preview_grid
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import is_cached, small_clip
    from ipshield.protect.base import accuracy_by_domain
    from ipshield import jobs
    from ipshield.protect.coop import CoOpConfig
    from ipshield.protect.ipclip import IPCLIPConfig
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
    background = None
    if watermark and not is_cached(preset):
        # the watermark part's innocent model needs a pretraining of its own: run it in a second process
        # while this one pretrains the small CLIP (bitwise the same model as pretrained later, alone)
        background = _pretrain_in_background(preset, _innocent_overrides(preset, seed, innocent_steps)[0],
                                             run.path / "innocent_pretrain.log", console)
    try:
        clip_dir = small_clip(preset)
        adapter = load_clip(clip_dir)
        timings["small_clip"] = time.perf_counter() - t
        console.print(f"[bold]small CLIP[/]: {clip_dir} ({timings['small_clip']:.1f} s)")
        if background is not None:  # wait: the next steps run best without a second job on the cores
            t = time.perf_counter()
            rc = background.wait()
            timings["innocent_wait"] = time.perf_counter() - t
            log = run.path / "innocent_pretrain.log"
            if rc == 0:
                log.unlink(missing_ok=True)
            console.print("[bold]innocent model[/]: pretrained alongside, "
                          + (f"{timings['innocent_wait']:.1f} s more" if rc == 0 else
                             f"failed (exit {rc}, see {log}); it is pretrained again later"))
    except BaseException:
        if background is not None and background.poll() is None:
            background.terminate()
            background.wait()
        raise

    classes = next(iter(domains.values())).classes
    acc: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    acc["zero-shot"] = accuracy_by_domain(ZeroShotClassifier(adapter, classes), domains)
    timings["zero_shot"] = time.perf_counter() - t

    # CoOp and IP-CLIP through the jobs layer (the same job as `ipshield protect coop|ip-clip`), each
    # in its own run folder; the demo always recomputes, so an earlier demo's folders are replaced
    t = time.perf_counter()
    coop_opts: dict = {}
    jobs.protect("coop", domains=domains, authorized=authorized, out=run.path / "coop", model=adapter,
                 config=CoOpConfig(seed=seed), options=coop_opts, overwrite=True)
    coop = coop_opts["trained_model"]
    acc["CoOp"] = accuracy_by_domain(coop, domains)
    timings["coop"] = time.perf_counter() - t

    # IP-CLIP: restrict the small CLIP to the authorized domain (target-specified: every other
    # built-in domain is a labelled unauthorized domain)
    t = time.perf_counter()
    others = [d for d in domains if d != authorized]
    m = jobs.protect("ip-clip", domains=domains, authorized=authorized, unauthorized=others, out=run.path / "ip-clip",
                     model=adapter, options={"coop": coop},
                     config=IPCLIPConfig(recipe="spec", epochs=ipclip_epochs, max_train=500, augment=False, lr=ipclip_lr,
                                          seed=seed),
                     overwrite=True)
    acc["IP-CLIP"] = m["accuracy"]["after"]
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
    if watermark:
        t = time.perf_counter()
        metrics["watermark"] = watermark_demo(adapter, clip_dir, preset, run.path, console, seed, steal_pairs,
                                              steal_epochs, innocent_steps)
        timings["watermark"] = time.perf_counter() - t
        timings["innocent_model"] = metrics["watermark"]["innocent_seconds"]  # part of "watermark"
    run.save_metrics(metrics)
    run.finish()
    console.print(f"run folder: {run.path}  (metrics.json, accuracy.png, samples.png"
                  f"{', watermark.md' if watermark else ''})")
    return metrics


def _innocent_overrides(preset: str, seed: int, innocent_steps: int | None) -> tuple[list[str], int]:
    """The innocent model of the watermark part: the preset's recipe, another seed and other data,
    ``innocent_steps`` (default: half the preset's) steps. Returns (overrides, steps)."""
    from ipshield.models.tiny_clip import preset_config

    steps = innocent_steps or max(100, preset_config(preset).steps // 2)
    return [f"seed={seed + 1}", f"data_seed={seed + 11}", f"steps={steps}"], steps


def _pretrain_in_background(preset: str, overrides: list[str], log: Path, console):
    """Start ``small_clip(preset, overrides)`` in a child process with one worker thread (its cache
    lock makes a later ``small_clip`` call wait for it, or pretrain again if it failed); None when it
    is cached or fewer than 2 cores are usable (nothing to gain)."""
    import subprocess
    import sys

    from ipshield.models.tiny_clip import is_cached, usable_cores

    if usable_cores() < 2 or is_cached(preset, overrides):
        return None
    code = ("import sys; from ipshield.models.tiny_clip import small_clip; "
            "small_clip(sys.argv[1], sys.argv[2:], show_progress=False)")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code, preset, *overrides, "workers=1"], stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT)
    console.print(f"[bold]innocent model[/]: pretraining in a background process (pid {proc.pid}) alongside")
    return proc


def watermark_demo(adapter, clip_dir: Path, preset: str, out: Path, console, seed: int = 0, steal_pairs: int = 6000,
                   steal_epochs: int = 12, innocent_steps: int | None = None) -> dict:
    """Watermark the small CLIP's service (VLPMarker over an EmbMarker text layer, 3 customers), let
    customer-1 steal it, verify the thief (as is, rotated, and with its coordinates permuted), a
    rotated relay of the service and an innocent model. The owner's key and watermark folder go to
    ``out/owner`` (mode 700); nothing secret is printed or written elsewhere."""
    import os

    from rich.table import Table

    from ipshield.attacks.watermark import ExtractConfig, extract_student, permute, query_service, rotate
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip
    from ipshield.watermark.base import CleanEncoder, reference_from_synthetic, zero_shot_accuracy
    from ipshield.watermark.keys import MasterKey
    from ipshield.watermark.stacked import StackedMarker
    from ipshield.watermark.verify import Suspect, identify_customer, verify

    customers, thief = ["customer-0", "customer-1", "customer-2"], "customer-1"
    owner = out / "owner"
    owner.mkdir(parents=True, exist_ok=True)
    os.chmod(owner, 0o700)
    key = MasterKey.generate(int(adapter.embed_dim))
    key.save(owner / "key.json")
    wm = StackedMarker.fit(adapter, key, reference_from_synthetic(600, seed=1))
    wm.save(owner / "watermark")
    # the owner's folder names the clean model and the customers, so that
    # `ipshield verify --key owner/key.json --watermark owner/watermark --model SUSPECT --identify` needs no other flag
    from ipshield.watermark.base import read_watermark_json, write_watermark_json

    info = read_watermark_json(owner / "watermark")
    info["model"] = str(Path(clip_dir).resolve())
    info["customers"] = list(customers)
    write_watermark_json(owner / "watermark", {k: v for k, v in info.items() if k != "format"})
    service = wm.encoder(adapter, thief)
    doms = load_synthetic(n_train=200, n_test=300, seed=seed)
    zs_clean = zero_shot_accuracy(CleanEncoder(adapter), doms)
    zs_served = zero_shot_accuracy(service, doms)
    change = max(abs(zs_served[d] - zs_clean[d]) for d in zs_clean)
    console.print(f"[bold]watermark[/]: VLPMarker over an EmbMarker text layer for {len(customers)} customers; "
                  f"zero-shot change under the watermark: max {change:.2f} points")

    public = reference_from_synthetic(steal_pairs, seed=5, split="train")
    targets = query_service(service, public, steal_pairs)
    student, info = extract_student(None, public, clip_dir, ExtractConfig(n_queries=steal_pairs, epochs=steal_epochs,
                                                                          seed=seed), targets=targets)
    zs_student = zero_shot_accuracy(CleanEncoder(student), doms)
    console.print(f"[bold]theft[/]: {thief} sent {info['queries']} queries; the student's zero-shot mean "
                  f"{sum(zs_student.values()) / len(zs_student):.1f}% (service "
                  f"{sum(zs_clean.values()) / len(zs_clean):.1f}%)")

    # an innocent model: the same recipe, independently pretrained (other seed, other data)
    overrides, steps = _innocent_overrides(preset, seed, innocent_steps)
    t_innocent = time.perf_counter()
    innocent = load_clip(small_clip(preset, overrides, show_progress=False))
    innocent_s = time.perf_counter() - t_innocent
    console.print(f"[bold]innocent model[/]: {steps}-step small CLIP, other seed and data ({innocent_s:.1f} s here)")
    probes = reference_from_synthetic(512, seed=9)
    suspects = {"thief (student)": CleanEncoder(student),
                "thief, rotated": rotate(CleanEncoder(student), dim=int(adapter.embed_dim)),
                "thief, coordinates permuted and sign-flipped": permute(CleanEncoder(student), dim=int(adapter.embed_dim),
                                                                        signs=True),
                "innocent model": CleanEncoder(innocent),
                "relay of the service, rotated": rotate(service, dim=int(adapter.embed_dim))}
    rows = []
    table = Table(title=f"ownership verification of {thief}'s watermark (at most 512 queries, alpha 1e-6)")
    for col in ("suspect", "verdict", "p-value", "strongest test", "queries"):
        table.add_column(col)
    for name, emb in suspects.items():
        rep = verify(wm, Suspect.from_embedder(emb, name=name), adapter, probes, thief, max_queries=512)
        best = min((t for t in rep.tests.values() if t.in_decision and t.p_value == t.p_value),
                   key=lambda t: t.p_value, default=None)
        rows.append({"suspect": name, "verdict": rep.verdict, "p_value": rep.p_value,
                     "strongest_test": best.name if best else None, "queries": rep.queries["total"],
                     "p": {k: t.p_value for k, t in rep.tests.items()}})
        table.add_row(name, rep.verdict, f"{rep.p_value:.2g}", best.name if best else "-", str(rep.queries["total"]))
    console.print(table)
    who = identify_customer(wm, Suspect.from_embedder(CleanEncoder(student)), adapter, probes, customers, max_queries=512)
    top = who.ranking[0]["customer_id"]
    console.print(f"[bold]leak traced to[/]: {top} (p={who.p_value:.2g} among {len(customers)} customers, "
                  f"{'significant' if who.verdict == 'stolen' else 'not significant'} at 1e-6; true: {thief})")
    lines = ["| suspect | verdict | p-value | strongest test | queries |", "|---|---|---|---|---|"]
    lines += [f"| {r['suspect']} | {r['verdict']} | {r['p_value']:.2g} | {r['strongest_test']} | {r['queries']} |" for r in rows]
    (out / "watermark.md").write_text("\n".join(lines) + "\n")
    return {"scheme": wm.scheme, "customers": customers, "thief": thief, "zero_shot_clean": zs_clean,
            "zero_shot_served": zs_served, "max_abs_zero_shot_change": change, "student_zero_shot": zs_student,
            "student_queries": info["queries"], "innocent_steps": steps, "innocent_seconds": innocent_s,
            "verification": rows,
            "identified": top, "identified_verdict": who.verdict, "identified_p": who.p_value}
