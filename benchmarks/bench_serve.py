"""Load benchmark of the embedding service on loopback (see ``ipshield.serve.bench``).

    .venv/bin/python benchmarks/bench_serve.py --model ~/.cache/ipshield/small_clip/<preset-folder> \
        [--requests 2000] [--concurrency 32] [--kind image|text] [--rounds 4] [--threads 1] [--out runs/bench-serve]

Starts four servers (watermark on/off x batching on/off), interleaves the load over them, prints
throughput and p50/p99 latency per configuration, the 5xx count, and the on/off ratios. Exits 1 if
any request got a 5xx. ``--model stub`` measures the service machinery alone (no model).
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="CLIP folder (default: the cached small CLIP), or stub[:DIM]")
    ap.add_argument("--requests", type=int, default=2000, help="requests per configuration")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--kind", choices=["image", "text"], default="image")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--key-file", default=None, help="master key (default: a fresh one)")
    ap.add_argument("--watermark-dir", default=None, help="VLPMarker folder to serve (default: the key's orthogonal matrices)")
    ap.add_argument("--out", default="runs/bench-serve")
    args = ap.parse_args()

    from ipshield.serve.bench import print_result, run_bench

    model = args.model
    if model is None:
        from ipshield.models.tiny_clip import small_clip

        model = str(small_clip("default"))
    res = run_bench(model, requests=args.requests, concurrency=args.concurrency, kind=args.kind, rounds=args.rounds,
                    key_file=args.key_file, watermark_dir=args.watermark_dir, threads=args.threads, out=args.out)
    print_result(res)
    sys.exit(1 if res["total_5xx"] else 0)


if __name__ == "__main__":
    main()
