"""Load benchmark of the embedding service on loopback (a benchmark, not a timed test).

Starts one ``ipshield serve`` subprocess per configuration (watermark on/off x micro-batching
on/off), each with its own SQLite database and a key with a high rate limit, then sends the same
workload to each from an async httpx client: ``concurrency`` clients, ``requests`` requests in all,
each request one image (or one text). The configurations are measured in interleaved rounds
(round-robin over the servers) so that background load on a shared machine hits them all alike.
Prints throughput, p50/p99 latency and the count of 5xx per configuration, and the two ratios the
service promises: watermark on / off (>= 0.95) and batching on / off.

The same rounds also measure the *floor* (``python -m ipshield.serve.floor``: the same backend behind
a bare FastAPI app without auth, limits, audit, watermark or batching) and report, for each ipshield
configuration, its server CPU per request divided by the floor's (``floor_ratios``; the project's
target: <= 2.0 for "watermark on, batching on" with the small CLIP). ``floor=False`` skips it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLI = "import sys; from ipshield.cli import main; main(sys.argv[1:])"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    status: dict[int, int] = field(default_factory=dict)
    cpu: float = 0.0  # server CPU seconds spent on the measured requests

    def summary(self) -> dict:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        n = len(self.latencies)
        return {"config": self.name, "requests": n, "throughput_rps": n / self.wall if self.wall else 0.0,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "n_5xx": sum(v for k, v in self.status.items() if k >= 500),
                "n_ok": self.status.get(200, 0), "status": {str(k): v for k, v in sorted(self.status.items())},
                "server_cpu_ms_per_request": 1000 * self.cpu / n if n and self.cpu else None}


def _payloads(kind: str, n: int = 64, size: int = 32, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "text":
        words = ["digit", "photo", "red", "blue", "seven", "three", "a", "of", "the", "sketch", "noisy", "bright"]
        return [{"texts": [" ".join(rng.choice(words, 6))]} for _ in range(n)]
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append({"images": [base64.b64encode(buf.getvalue()).decode()]})
    return out


async def _load(url: str, key: str, payloads: list[dict], n: int, concurrency: int, kind: str, res: Result) -> None:
    import httpx

    path = "/v1/embed/texts" if kind == "text" else "/v1/embed/images"
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits) as c:
        async def worker():
            for i in counter:
                t0 = time.perf_counter()
                try:
                    r = await c.post(path, json=payloads[i % len(payloads)])
                    code = r.status_code
                except Exception:
                    code = 599
                res.latencies.append(time.perf_counter() - t0)
                res.status[code] = res.status.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        res.wall += time.perf_counter() - t0


FLOOR = "floor (bare FastAPI)"


def _launch(model: str, watermark: bool, batching: bool, key_file: str | None, watermark_dir: str | None, threads: int,
            workdir: Path, name: str, port: int) -> tuple[subprocess.Popen, str, str]:
    """Start one ``ipshield serve`` (after creating its key); ``_wait_ready`` waits for it."""
    db = f"sqlite:///{workdir}/{name}.db"
    made = subprocess.run([sys.executable, "-c", CLI, "keys", "create", "--db", db, "--customer", "bench", "--rate", "1000000"],
                          capture_output=True, text=True, check=True)
    key = [l.split()[-1] for l in made.stdout.splitlines() if l.startswith("api key:")][0]
    cmd = [sys.executable, "-c", CLI, "serve", "--model", model, "--db", db, "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads), "--log-level", "warning", "--rate", "1000000",
           "--watermark" if watermark else "--no-watermark", "--batching" if batching else "--no-batching"]
    if watermark and key_file:
        cmd += ["--key-file", key_file]
    if watermark and watermark_dir:
        cmd += ["--watermark-dir", watermark_dir]
    return _popen(cmd, threads, workdir, name), f"http://127.0.0.1:{port}", key


def _launch_floor(model: str, threads: int, workdir: Path, name: str, port: int) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "ipshield.serve.floor", "--model", model, "--port", str(port), "--threads", str(threads)]
    # the floor ignores the Authorization header; the client sends one anyway (same requests)
    return _popen(cmd, threads, workdir, name), f"http://127.0.0.1:{port}", "floor-ignores-keys"


def _popen(cmd: list[str], threads: int, workdir: Path, name: str) -> subprocess.Popen:
    with open(workdir / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def _wait_ready(proc: subprocess.Popen, url: str, workdir: Path, name: str, timeout: float = 120.0) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited: see {workdir / (name + '.log')}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server {name} did not start")


def run_bench(model: str, requests: int = 2000, concurrency: int = 32, kind: str = "image", rounds: int = 4,
              key_file: str | None = None, watermark_dir: str | None = None, threads: int = 1,
              configs: list[tuple[str, bool, bool]] | None = None, out: str | None = None, warmup: int = 64,
              floor: bool = True) -> dict:
    from ipshield.serve.server import free_port

    workdir = Path(tempfile.mkdtemp(prefix="ipshield-bench-"))
    if key_file is None:
        # a fresh master key for the model's embedding size
        from ipshield.serve.backend import load_backend

        dim = int(load_backend(model).dim) if model.startswith("stub") else _clip_dim(model)
        from ipshield.watermark.keys import keygen

        key_file = str(keygen(workdir / "master_key.json", dim)[0])
    configs = configs or [("watermark off, batching on", False, True), ("watermark on, batching on", True, True),
                          ("watermark off, batching off", False, False), ("watermark on, batching off", True, False)]
    names = [name for name, *_ in configs] + ([FLOOR] if floor else [])
    servers = {}
    try:
        # launch every server first, then wait for all of them (start-ups overlap)
        for i, (name, wm, batch) in enumerate(configs):
            servers[name] = _launch(model, wm, batch, key_file, watermark_dir, threads, workdir, f"server{i}", free_port())
        if floor:
            servers[FLOOR] = _launch_floor(model, threads, workdir, "floor", free_port())
        for i, (name, (proc, url, _)) in enumerate(servers.items()):
            _wait_ready(proc, url, workdir, "floor" if name == FLOOR else f"server{i}")
        payloads = _payloads(kind)
        results = {name: Result(name) for name in names}
        round_cpu: dict[str, list[float]] = {name: [] for name in names}
        for name, (proc, url, key) in servers.items():  # warm-up (first calls, matrix derivation)
            asyncio.run(_load(url, key, payloads, warmup, min(concurrency, 8), kind, Result("warmup")))
        per_round = max(1, requests // rounds)
        round_rps: dict[str, list[float]] = {name: [] for name in results}
        for r in range(rounds):
            order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
            for name, (proc, url, key) in order:
                one = Result(name)
                c0 = _cpu_seconds(proc.pid)
                asyncio.run(_load(url, key, payloads, per_round, concurrency, kind, one))
                c1 = _cpu_seconds(proc.pid)
                if c0 is not None and c1 is not None:
                    results[name].cpu += c1 - c0
                    round_cpu[name].append((c1 - c0) / max(1, len(one.latencies)))
                round_rps[name].append(len(one.latencies) / one.wall)
                res = results[name]
                res.latencies += one.latencies
                res.wall += one.wall
                for k, v in one.status.items():
                    res.status[k] = res.status.get(k, 0) + v
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = [results[name].summary() for name in names]
    by = {r["config"]: r for r in rows}
    # two estimates of each ratio: total throughput, and the median over rounds of the ratio of the
    # two configurations measured back to back in that round (robust to drifting background load)
    ratios, paired, cpu_ratios = {}, {}, {}
    pairs = [(f"watermark on/off (batching {b})", f"watermark on, batching {b}", f"watermark off, batching {b}") for b in ("on", "off")]
    pairs += [(f"batching on/off (watermark {w})", f"watermark {w}, batching on", f"watermark {w}, batching off") for w in ("on", "off")]
    for label, a_name, b_name in pairs:
        a_row, b_row = by.get(a_name), by.get(b_name)
        if a_row and b_row and b_row["throughput_rps"]:
            ratios[label] = a_row["throughput_rps"] / b_row["throughput_rps"]
            paired[label] = float(np.median(np.array(round_rps[a_name]) / np.array(round_rps[b_name])))
            if a_row["server_cpu_ms_per_request"] and b_row["server_cpu_ms_per_request"]:
                # capacity ratio from server CPU per request (insensitive to other processes' load)
                cpu_ratios[label] = b_row["server_cpu_ms_per_request"] / a_row["server_cpu_ms_per_request"]
    # server CPU per request of each ipshield configuration / the floor's: on the totals, and the
    # median over rounds of the per-round ratio (both measured in the same round)
    floor_ratios, floor_paired = {}, {}
    f_row = by.get(FLOOR)
    if f_row and f_row["server_cpu_ms_per_request"]:
        for name, *_ in configs:
            cpu = by[name]["server_cpu_ms_per_request"]
            if cpu:
                floor_ratios[name] = cpu / f_row["server_cpu_ms_per_request"]
                a, b = np.array(round_cpu[name]), np.array(round_cpu[FLOOR])
                if len(a) == len(b) and len(a) and np.all(b > 0):
                    floor_paired[name] = float(np.median(a / b))
    result = {"model": model, "kind": kind, "requests_per_config": rows[0]["requests"], "concurrency": concurrency,
              "rounds": rounds, "server_threads": threads, "rows": rows, "ratios": ratios, "paired_ratios": paired, "cpu_ratios": cpu_ratios,
              "round_rps": round_rps, "floor": FLOOR if floor else None, "floor_ratios": floor_ratios,
              "floor_paired_ratios": floor_paired,
              "total_5xx": sum(r["n_5xx"] for r in rows)}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_serve.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _clip_dim(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return int(cfg.get("projection_dim") or cfg.get("text_config", {}).get("projection_dim"))


def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"load on loopback: {result['requests_per_config']} {result['kind']} requests per config, "
                    f"{result['concurrency']} concurrent clients")
    for c in ("config", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "5xx", "status"):
        t.add_column(c)
    for r in result["rows"]:
        cpu = r.get("server_cpu_ms_per_request")
        t.add_row(r["config"], f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  "-" if cpu is None else f"{cpu:.2f}", str(r["n_5xx"]), json.dumps(r["status"]))
    c = Console(width=None if sys.stdout.isatty() else 140)
    c.print(t)
    for k, v in result["ratios"].items():
        cr = result.get("cpu_ratios", {}).get(k)
        c.print(f"{k}: {v:.3f} (throughput), {result['paired_ratios'][k]:.3f} (median of per-round paired ratios)"
                + ("" if cr is None else f", {cr:.3f} (server CPU per request)"))
    fr = result.get("floor_ratios") or {}
    if result.get("floor"):
        c.print(f"server CPU per request / the floor's ({result['floor']}; target <= 2.0 for 'watermark on, batching on'):")
        for k, v in fr.items():
            p = (result.get("floor_paired_ratios") or {}).get(k)
            c.print(f"  {k}: {v:.2f}x" + ("" if p is None else f" (median of per-round ratios {p:.2f}x)"))
        if not fr:
            c.print("  unavailable (no server CPU times: /proc is Linux only)")
    c.print(f"total 5xx: {result['total_5xx']}")
