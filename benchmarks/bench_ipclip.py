"""IP-CLIP training speed: the naive path against the fast path, in one run, on the same data.

naive: the frozen image tower runs on every batch of every step, text sequences padded to the
       full context length, fp32;
fast:  the image tower runs once per training image (``cache_features``), text sequences cut after
       the longest real prompt (``truncate_text``), the [SOS + context] prefix run once per image
       instead of once per image and class (``share_prefix``), bf16 autocast on GPU (``amp``).

Both train the same model from the same seed without random augmentation (the only setting in
which the two paths compute the same thing, so the accuracies must agree), then report training
throughput (training images per second, the caching and bank passes included), peak memory
(resident set growth sampled from /proc on CPU; ``torch.cuda.max_memory_allocated`` on GPU) and
test accuracy.

    .venv/bin/python benchmarks/bench_ipclip.py [--preset default] [--epochs 2] [--n-train 400]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


class PeakRSS:
    """Peak resident set size during a block, above the level at its start (Linux /proc)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        import gc

        gc.collect()
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="CLIP folder (default: the small CLIP of the preset)")
    p.add_argument("--preset", default="default", help="small-CLIP preset when --model is not given")
    p.add_argument("--authorized", default="clean")
    p.add_argument("--unauthorized", default="inverted")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--path", choices=["naive", "fast"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip
    from ipshield.protect.ipclip import IPCLIPConfig, accuracy_on_sets, evaluation_sets, train_ipclip
    from ipshield.utils import resolve_device

    device = resolve_device(args.device)
    adapter = load_clip(args.model or small_clip(args.preset), device=device)
    doms = load_synthetic([args.authorized, args.unauthorized], n_train=args.n_train, n_test=args.n_test)
    _, sets = evaluation_sets(doms, args.authorized, "target-specified")
    base = dict(epochs=args.epochs, augment=False, max_train=args.n_train, device=device.type)
    paths = {
        "naive": IPCLIPConfig(**base, cache_features=False, truncate_text=False, share_prefix=False, amp=False),
        "fast": IPCLIPConfig(**base, cache_features=True, truncate_text=True, share_prefix=True, amp=True),
    }
    if args.path:  # child process: one path, fresh memory
        name, cfg = args.path, paths[args.path]
        # untimed warm-up (first-call costs of torch/transformers are not the path's throughput)
        train_ipclip(adapter, doms[args.authorized], [doms[args.unauthorized]],
                     cfg.model_copy(update={"epochs": 1, "max_train": 16}), verbose=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            model = train_ipclip(adapter, doms[args.authorized], [doms[args.unauthorized]], cfg, verbose=False)
            seconds = time.perf_counter() - t0
        acc = accuracy_on_sets(model, sets, adapter)
        n_images = model.timing["steps"] * min(cfg.batch_size, args.n_train)
        res = {
            "seconds": seconds,
            "images_per_s": n_images / seconds,
            "peak_mem_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else mem.mib,
            "memory": "cuda max_memory_allocated" if device.type == "cuda" else "RSS growth during training",
            "accuracy": acc,
            "final_loss": model.history[-1]["total"],
        }
        print("RESULT " + json.dumps(res))
        return res
    import subprocess
    import sys

    results = {}
    for name in paths:  # each path in a fresh process so the memory peaks do not share an allocator
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--path", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"the {name} path failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(line[-1][len("RESULT "):])
    speedup = results["fast"]["images_per_s"] / results["naive"]["images_per_s"]
    max_acc_diff = max(abs(results["fast"]["accuracy"][k] - results["naive"]["accuracy"][k]) for k in sets)
    print(f"IP-CLIP training, {args.epochs} epochs x {args.n_train} authorized images (+ as many unauthorized), "
          f"batch 8+8, {adapter.vision_layers}x{adapter.vision_width} vision / {adapter.text_layers}x{adapter.text_width} text, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'path':<6} {'images/s':>9} {'seconds':>8} {'peak MiB':>9}  accuracy (%)")
    for name, r in results.items():
        accs = ", ".join(f"{k}={v:.1f}" for k, v in r["accuracy"].items())
        print(f"{name:<6} {r['images_per_s']:>9.1f} {r['seconds']:>8.1f} {r['peak_mem_mib']:>9.1f}  {accs}")
    print(f"speed-up fast/naive: {speedup:.2f}x (target >= 3x on CPU); largest accuracy difference: {max_acc_diff:.2f} points")
    out = {"results": results, "speedup": speedup, "max_accuracy_difference": max_acc_diff, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
