"""Throughput of the small CLIP's pretraining (``ipshield.models.tiny_clip.pretrain``): old vs new
in one run, interleaved so that both meet the same load on a shared machine.

Variants (all the same recipe: preset, steps, batch, data, seed; the weights are bitwise the same):

- ``old``: ``workers=1`` -- everything in turn on one thread, the loop as it was;
- ``new``: the defaults -- on 2 usable cores the image tower and the text tower of a step run side by
  side on 2 Python threads (one torch thread each) and the next batch is made meanwhile;
- ``omp2`` (only with ``--variants``): the old loop with 2 OpenMP threads (``workers=1 threads=2``).

Each repetition pretrains ``--steps`` steps per variant (no evaluation; the training images are
generated once and shared) and reads the loop's wall and process CPU time from ``pretrain.json``.
Prints a table: steps/s, CPU s/step, wall per step, the implied time of the preset's full run;
``--check`` also asserts that every variant's weights are bitwise those of the first.

``--pair`` measures the demo's pretraining phase instead: the small CLIP (``--steps``) and the
watermark part's innocent model (other seed and data, half the steps), one after the other on one
thread each (old) vs side by side as ``ipshield demo`` now runs them (the innocent one in a child
process with one worker, the small CLIP with the default workers).

    .venv/bin/python benchmarks/bench_pretrain.py                 # default preset, 40 steps x 3
    .venv/bin/python benchmarks/bench_pretrain.py --steps 60 --reps 5 --variants old,new,omp2 --check
    .venv/bin/python benchmarks/bench_pretrain.py --pair --steps 200 --reps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path


def _load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


VARIANTS = {"old": ["workers=1"], "new": [], "omp2": ["workers=1", "threads=2"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=40, help="steps per variant and repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (variants interleaved in each)")
    ap.add_argument("--variants", default="old,new", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--check", action="store_true", help="assert that the weights are bitwise the same in every run")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    ap.add_argument("--pair", action="store_true", help="the demo's two pretrainings: in turn vs side by side")
    args = ap.parse_args(argv)
    if args.pair:
        return _pair(args)

    from ipshield.models import tiny_clip

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    full_steps = tiny_clip.preset_config(args.preset).steps

    # the training images once for all runs (they depend on the data fields only, equal in every variant)
    load_pools, memo = tiny_clip._load_pools, {}

    def cached_pools(config, *a, **kw):
        key = json.dumps({k: config.to_dict()[k] for k in ("domains", "n_per_domain", "data_size", "data_seed",
                                                            "include_digits", "digits", "digits_root")},
                         sort_keys=True, default=str)
        if key not in memo:
            memo[key] = load_pools(config, *a, **kw)
        return memo[key]

    tiny_clip._load_pools = cached_pools
    rows: dict[str, list[dict]] = {v: [] for v in names}
    reference = None
    print(f"preset {args.preset}: {args.steps} steps x {args.reps} repetitions per variant; "
          f"{tiny_clip.usable_cores()} usable cores; load average {_load_avg()}", flush=True)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
            for rep in range(args.reps):
                for v in (names if rep % 2 == 0 else names[::-1]):  # alternate the order between repetitions
                    cfg = tiny_clip.preset_config(args.preset, [f"steps={args.steps}", *VARIANTS[v]])
                    out = tiny_clip.pretrain(cfg, Path(tmp) / f"{v}-{rep}", show_progress=False, evaluate=False)
                    info = json.loads((out / "pretrain.json").read_text())
                    r = {"wall_s": info["train_seconds"], "cpu_s": info["train_cpu_seconds"],
                         "workers": info.get("workers", 1), "threads": info.get("threads"),
                         "final_loss": info["final_loss"]}
                    rows[v].append(r)
                    if args.check:
                        weights = (out / "model.safetensors").read_bytes()
                        reference = reference or weights
                        assert weights == reference, f"{v} (repetition {rep}): the weights differ"
                    print(f"  rep {rep} {v:5s}: {args.steps / r['wall_s']:6.2f} steps/s, "
                          f"{r['cpu_s'] / args.steps:.3f} CPU s/step (load {_load_avg()})", flush=True)
    finally:
        tiny_clip._load_pools = load_pools

    def med(v, key):
        return statistics.median(r[key] for r in rows[v])

    base = names[0]
    print()
    print(f"| variant | workers x torch threads | steps/s (median) | CPU s/step | wall s/step | "
          f"{full_steps} steps, implied | speed-up vs {base} |")
    print("|---|---|---|---|---|---|---|")
    for v in names:
        wall = med(v, "wall_s") / args.steps
        cpu = med(v, "cpu_s") / args.steps
        r = rows[v][0]
        print(f"| {v} | {r['workers']} x {r['threads']} | {1 / wall:.2f} | {cpu:.3f} | {wall:.3f} | "
              f"{wall * full_steps:.0f} s | {med(base, 'wall_s') / med(v, 'wall_s'):.2f}x |")
    print(f"\n(load average at the end {_load_avg()}; {time.perf_counter() - t0:.0f} s in all"
          + ("; weights bitwise identical in every run" if args.check else "")
          + "; the recorded `make demo` pretraining before this change: 291 s for 1200 steps)")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


def _pretrain_cmd(preset: str, overrides: list[str], out: Path) -> list[str]:
    code = ("import sys; from pathlib import Path; from ipshield.models import tiny_clip as t; "
            "t.pretrain(t.preset_config(sys.argv[1], sys.argv[3:]), Path(sys.argv[2]), show_progress=False, "
            "evaluate=False)")
    return [sys.executable, "-c", code, preset, str(out), *overrides]


def _pair(args) -> int:
    """Wall and CPU time of the two pretrainings of the demo, in turn vs side by side (each pretraining
    in a fresh process, as in the demo; the times include start-up and data)."""
    import resource
    import subprocess

    main_ov = [f"steps={args.steps}"]
    innocent_ov = ["seed=1", "data_seed=11", f"steps={max(1, args.steps // 2)}"]
    rows: dict[str, list[tuple[float, float]]] = {"in turn (old)": [], "side by side (new)": []}
    print(f"preset {args.preset}: the small CLIP {args.steps} steps + the innocent model {args.steps // 2} steps, "
          f"{args.reps} repetitions; load average {_load_avg()}", flush=True)

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    with tempfile.TemporaryDirectory(prefix="bench-pair-") as tmp:
        for rep in range(args.reps):
            order = list(rows) if rep % 2 == 0 else list(rows)[::-1]
            for v in order:
                t, c = time.perf_counter(), children_cpu()
                main = _pretrain_cmd(args.preset, main_ov + (["workers=1"] if "old" in v else []), Path(tmp) / f"m{rep}{v[0]}")
                innocent = _pretrain_cmd(args.preset, innocent_ov + ["workers=1"], Path(tmp) / f"i{rep}{v[0]}")
                if "old" in v:
                    subprocess.run(main, check=True)
                    subprocess.run(innocent, check=True)
                else:
                    child = subprocess.Popen(innocent)
                    subprocess.run(main, check=True)
                    if child.wait() != 0:
                        raise SystemExit("the innocent pretraining failed")
                rows[v].append((time.perf_counter() - t, children_cpu() - c))
                print(f"  rep {rep} {v:20s}: {rows[v][-1][0]:6.1f} s wall, {rows[v][-1][1]:6.1f} s CPU "
                      f"(load {_load_avg()})", flush=True)
    print()
    print("| the demo's two pretrainings | wall s (median) | CPU s | speed-up |")
    print("|---|---|---|---|")
    base = statistics.median(w for w, _ in rows["in turn (old)"])
    for v, r in rows.items():
        wall = statistics.median(w for w, _ in r)
        print(f"| {v} | {wall:.1f} | {statistics.median(c for _, c in r):.1f} | {base / wall:.2f}x |")
    print(f"\n(load average at the end {_load_avg()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
