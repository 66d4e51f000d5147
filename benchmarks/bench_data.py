"""Generation speed of the synthetic domains (and the cost of the strong augmentation).

    .venv/bin/python benchmarks/bench_data.py [--n-train 2000] [--n-test 500] [--threads 2]

Prints one row per style and the total; every call generates from scratch (no cache).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ipshield.data.synthetic import STYLES, make_domain
    from ipshield.data.transforms import grid_watermark, strong_augment

    make_domain("clean", 20, 0)  # warm-up (first-call allocations)
    n = args.n_train + args.n_test
    print(f"synthetic generation: {n} images per domain ({args.n_train} train + {args.n_test} test), "
          f"{args.size}px, {args.threads} torch thread(s)")
    print(f"{'style':<10} {'seconds':>8} {'images/s':>10}")
    total = 0.0
    for style in STYLES:
        t = time.perf_counter()
        make_domain(style, args.n_train, args.n_test, seed=0, size=args.size)
        dt = time.perf_counter() - t
        total += dt
        print(f"{style:<10} {dt:8.2f} {n / dt:10.0f}")
    print(f"{'total':<10} {total:8.2f} {len(STYLES) * n / total:10.0f}   ({len(STYLES)} domains)")

    x = make_domain("color", 0, 1024, size=args.size).test.to_tensor()
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    strong_augment(x, g)
    dt_aug = time.perf_counter() - t
    t = time.perf_counter()
    grid_watermark(x)
    dt_wm = time.perf_counter() - t
    print(f"strong_augment on 1024 images: {dt_aug:.3f} s; grid_watermark: {dt_wm:.4f} s")


if __name__ == "__main__":
    main()
