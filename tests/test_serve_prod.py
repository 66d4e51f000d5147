"""The embedding service as an operator runs it and as a hostile client meets it: several server
processes on one database, SIGKILL under load, huge images, bodies before keys, slow clients,
failed authentications, the audit table as a leak, start-up races (each test reproduces one
failure of issue 17 first seen on the old service; loops are bounded, everything on loopback)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from ipshield.serve.db import api_keys, open_db, usage, usage_sketch
from ipshield.serve.server import LOOPBACK, free_port
from ipshield.serve.store import SKETCH_MIN, KeyStore

CLI = "import sys; from ipshield.cli import main; main(sys.argv[1:])"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database: a SQLite file, or a new schema in the CI's PostgreSQL (skips without it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    base = os.environ.get("IPSHIELD_TEST_PG_URL", "").strip()
    if not base:
        pytest.skip("PostgreSQL not available: IPSHIELD_TEST_PG_URL is not set (.ci/run sets it)")
    import secrets

    from sqlalchemy import text

    from ipshield.serve.db import make_engine

    schema = "t_" + secrets.token_hex(5)
    try:
        eng = make_engine(base)
        with eng.begin() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
        eng.dispose()
    except Exception as exc:
        pytest.skip(f"PostgreSQL at IPSHIELD_TEST_PG_URL does not answer ({type(exc).__name__})")
    return base + ("&" if "?" in base else "?") + f"options=-csearch_path%3D{schema}"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start(db: str, *extra: str, port: int | None = None, log: Path | None = None, env: dict | None = None):
    port = port or free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--model", "stub:16", "--db", db, "--host", LOOPBACK,
                             "--port", str(port), "--no-watermark", "--log-level", "warning", *extra],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, f"http://{LOOPBACK}:{port}"


def wait_up(procs_urls, timeout: float = 60.0) -> None:
    t0 = time.time()
    for proc, url in procs_urls:
        while True:
            assert proc.poll() is None, f"server {url} exited with {proc.returncode}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < timeout, "the servers did not start"
            time.sleep(0.1)


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def ledger(engine, key_id: str) -> tuple[int, int, int]:
    """(api_keys.used, audited items, audited requests) of one key."""
    with engine.connect() as c:
        used = c.execute(select(api_keys.c.used).where(api_keys.c.key_id == key_id)).scalar()
        items, reqs = c.execute(select(func.coalesce(func.sum(usage.c.images + usage.c.texts), 0),
                                       func.coalesce(func.sum(usage.c.requests), 0)).where(usage.c.key_id == key_id)).one()
    return int(used), int(items), int(reqs)


async def hammer(urls: list[str], key: str, n: int, concurrency: int, texts_per_request: int = 1, deadline: float | None = None):
    """Send ``n`` text requests spread over ``urls``; count what came back."""
    got = {"ok": 0, "items": 0, "status": {}}
    counter = iter(range(n))
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        async def worker(w):
            for i in counter:
                if deadline is not None and time.time() > deadline:
                    return
                url = urls[(i + w) % len(urls)]
                try:
                    r = await c.post(url + "/v1/embed/texts", json={"texts": [f"t{i} {j}" for j in range(texts_per_request)]})
                    code = r.status_code
                    if code == 200:
                        got["ok"] += 1
                        got["items"] += len(r.json()["embeddings"])
                except httpx.HTTPError:  # the server is gone: this client stops
                    got["status"][599] = got["status"].get(599, 0) + 1
                    return
                got["status"][code] = got["status"].get(code, 0) + 1

        await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return got


# ----------------------------------------------------------------------------- replicas
def test_quota_and_rate_hold_across_four_processes(db_url):
    """Old service: 4 processes served 400 embeddings on a quota of 100 (SQLite and PostgreSQL
    alike); a rate of 5/s let 96 requests through in 4 s with four processes."""
    db = db_url
    engine = open_db(db)
    store = KeyStore(engine)
    quota_key, qrec = store.create("quota", rate=100000, quota=100)
    rate_key, rrec = store.create("rate", rate=5, burst=5)
    servers = [start(db) for _ in range(4)]
    try:
        wait_up(servers)
        urls = [u for _, u in servers]
        got = asyncio.run(hammer(urls, quota_key, 400, 16))
        assert got["items"] <= 100 and got["items"] >= 95, got  # exact, not 4 x 100
        assert set(got["status"]) <= {200, 429}, got
        used, audited, _ = ledger(engine, qrec.key_id)
        print(f"\n4 processes, quota 100: served {got['items']}, used {used}, audited {audited}, statuses {got['status']}")
        assert used == got["items"] == audited, (used, audited, got)

        t0 = time.time()
        got = asyncio.run(hammer(urls, rate_key, 10000, 16, deadline=t0 + 4.0))
        elapsed = time.time() - t0
        allowed = 5 + 5 * elapsed  # the burst, then the rate, whatever the number of processes
        print(f"4 processes, rate 5/s burst 5: {got['ok']} served in {elapsed:.1f} s (allowed {allowed:.1f})")
        assert got["ok"] <= allowed + 1, (got, elapsed)
        assert got["ok"] >= 5, got
        assert got["status"].get(429, 0) > 0
    finally:
        stop([p for p, _ in servers])


def test_quota_holds_with_uvicorn_workers(tmp_path):
    db = f"sqlite:///{tmp_path}/w.db"
    engine = open_db(db)
    key, rec = KeyStore(engine).create("quota", rate=100000, quota=60)
    proc, url = start(db, "--workers", "3")
    try:
        wait_up([(proc, url)])
        got = asyncio.run(hammer([url], key, 200, 12))
        assert got["items"] == 60, got
        assert ledger(engine, rec.key_id)[:2] == (60, 60)
    finally:
        stop([proc])


# ----------------------------------------------------------------------------- crashes
def test_nothing_lost_when_servers_are_killed_under_load(tmp_path):
    """Old service after three SIGKILLs: 2,410 served, `used` 2,019, audit 2,006; a quota of 300
    served 755. Now a served embedding is counted and audited before it is sent."""
    db = f"sqlite:///{tmp_path}/k.db"
    engine = open_db(db)
    key, rec = KeyStore(engine).create("load", rate=100000, quota=100000)
    received = 0
    for round_ in range(3):
        proc, url = start(db)
        wait_up([(proc, url)])

        async def load_then_kill():
            task = asyncio.create_task(hammer([url], key, 10000, 8, texts_per_request=2, deadline=time.time() + 30))
            await asyncio.sleep(0.8)
            os.kill(proc.pid, signal.SIGKILL)
            return await task

        got = asyncio.run(load_then_kill())
        proc.wait(timeout=10)
        received += got["items"]
        used, audited, _ = ledger(engine, rec.key_id)
        print(f"round {round_}: client got {got['items']} ({got['status']}), used {used}, audited {audited}")
        in_flight = 8 * 2  # at most one request per client connection was between commit and reply
        assert used == audited, (used, audited)
        assert received <= used <= received + in_flight, (round_, received, used)
    assert received > 100  # the servers were under load when killed


# ----------------------------------------------------------------------------- memory
def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak memory")
def test_sixteen_4096px_images_keep_memory_bounded(tmp_path):
    """Old service: 16 images of 4096 x 4096 (a 1.2 MB body) peaked at 5.15 GB."""
    db = f"sqlite:///{tmp_path}/m.db"
    key, _ = KeyStore(open_db(db)).create("big", rate=1000)
    proc, url = start(db, "--max-request-pixels", str(16 * 4096 * 4096))
    try:
        wait_up([(proc, url)])
        h = {"Authorization": f"Bearer {key}"}
        small = httpx.post(url + "/v1/embed/texts", headers=h, json={"texts": ["warm up"]}, timeout=30)
        assert small.status_code == 200
        base = vm_hwm_mb(proc.pid)
        big = png(np.zeros((4096, 4096, 3), np.uint8))  # compresses to a few kB: the body is small
        body = {"images": [b64(big)] * 16}
        r = httpx.post(url + "/v1/embed/images", headers=h, json=body, timeout=120)
        assert r.status_code == 200, r.text[:300]
        peak = vm_hwm_mb(proc.pid)
        # one 4096^2 RGB image is 48 MB; the decode budget holds at most 4 at once, each shrunk at once
        assert peak - base < 600, (base, peak)
        print(f"\n16 x 4096^2 PNG request: peak RSS {peak:.0f} MB (+{peak - base:.0f} MB over the idle server)")
        # over the per-request pixel budget: refused from the headers, nothing decoded
        r2 = httpx.post(url + "/v1/embed/images", headers=h, json={"images": [b64(big)] * 17}, timeout=60)
        assert r2.status_code == 413 and r2.json()["error"]["code"] == "request_too_many_pixels"
    finally:
        stop([proc])


# ----------------------------------------------------------------------------- bodies, keys, slow clients
def test_no_body_is_read_before_the_key_and_slow_bodies_time_out(tmp_path):
    """Old service: a 60 MiB body with no key was parsed before the 401 (1.6-4.3 s, /health
    stalled); 200 clients that sent 1 of 1,000 bytes held their connections for good."""
    db = f"sqlite:///{tmp_path}/b.db"
    key, _ = KeyStore(open_db(db)).create("slow", rate=100000)
    proc, url = start(db, "--body-timeout", "1.5")
    try:
        wait_up([(proc, url)])
        port = int(url.rsplit(":", 1)[1])
        # a key-less request announcing 60 MiB: refused from the headers, the body never read
        s = socket.create_connection((LOOPBACK, port))
        s.sendall(b"POST /v1/embed/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 62914560\r\n\r\n" + b"[" * 1000)
        s.settimeout(5)
        t0 = time.time()
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head[:100]
        assert time.time() - t0 < 2.0  # from the headers: 60 MiB would take longer to even send
        s.close()

        # 200 authenticated clients sending 1 of 1000 bytes
        slow = []
        for _ in range(200):
            c = socket.create_connection((LOOPBACK, port))
            c.sendall(b"POST /v1/embed/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode() + b"{")
            slow.append(c)
        # meanwhile the service answers others
        t0 = time.time()
        r = httpx.post(url + "/v1/embed/texts", headers={"Authorization": f"Bearer {key}"}, json={"texts": ["hi"]}, timeout=10)
        assert r.status_code == 200 and time.time() - t0 < 5.0
        # and after the body deadline every slow client has its answer and a closed connection
        time.sleep(2.0)
        closed = 0
        for c in slow:
            c.settimeout(5)
            data = b""
            try:
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                pass
            closed += data.startswith(b"HTTP/1.1 408")
            c.close()
        assert closed == 200
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        stop([proc])


def test_failed_authentication_is_audited_and_throttled(tmp_path):
    """Old service: about 1,850 wrong secrets for one key id, `rejected` stayed 0, never slowed."""
    db = f"sqlite:///{tmp_path}/a.db"
    engine = open_db(db)
    key, rec = KeyStore(engine).create("victim", rate=100000)
    proc, url = start(db)
    try:
        wait_up([(proc, url)])
        wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        codes = [httpx.post(url + "/v1/embed/texts", headers={"Authorization": f"Bearer {wrong}"},
                            json={"texts": ["x"]}, timeout=10).status_code for _ in range(30)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
    finally:
        stop([proc])  # shutdown flushes the audit counts
    with engine.connect() as c:
        fails, rejected = c.execute(select(func.sum(usage.c.auth_failures), func.sum(usage.c.rejected))
                                    .where(usage.c.key_id == rec.key_id)).one()
    assert fails == 20 and rejected >= 20
    # the key's owner (another address in real life; here the throttle has expired) still gets in
    assert KeyStore(engine).lookup(key) is not None


# ----------------------------------------------------------------------------- what is stored
def test_audit_table_holds_nothing_that_gives_back_embeddings(tmp_path):
    """Old service: `usage.sketch` held the clean embedding of every one-request window, and the
    database file was 0644 whatever the umask."""
    from fastapi.testclient import TestClient

    from ipshield.serve.app import create_app
    from ipshield.serve.backend import StubBackend
    from ipshield.serve.settings import ServeSettings

    old = os.umask(0)
    try:
        db = f"sqlite:///{tmp_path}/p.db"
        engine = open_db(db)
    finally:
        os.umask(old)
    for f in tmp_path.glob("p.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
    key, rec = KeyStore(engine).create("c", rate=100000)
    settings = ServeSettings(db=db, model="stub", watermark=False, audit_window_s=1, flush_interval_s=0)
    app = create_app(settings, backend=StubBackend(32), engine=engine)
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {key}"}
        for i in range(3):  # three one-request windows
            assert client.post("/v1/embed/texts", headers=h, json={"texts": [f"text {i}"]}).status_code == 200
            time.sleep(1.05)
        assert client.post("/v1/embed/texts", headers=h, json={"texts": [f"x{i}" for i in range(40)]}).status_code == 200
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(usage).where(usage.c.sketch.is_not(None))).scalar() == 0
        rows = list(c.execute(select(usage_sketch)))
    assert rows and all(r.n >= SKETCH_MIN for r in rows)  # only the 40-text window, as two scalars
    assert {k for k in rows[0]._mapping} == {"id", "key_id", "window_start", "writer", "n", "spread", "eff_rank"}


def test_processes_starting_together_on_a_fresh_database(db_url):
    """Old service: 2 of 12 processes died with "table ipshield_schema already exists" /
    UniqueViolation."""
    code = ("import sys; from ipshield.serve.db import open_db; open_db(sys.argv[1]); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-300:] for o in outs]
    from ipshield.serve.db import SCHEMA_VERSION, current_version, make_engine

    with make_engine(db_url).connect() as c:
        assert current_version(c) == SCHEMA_VERSION


def test_requests_that_fail_are_not_charged(tmp_path):
    """Old service: a mixed request ending in 429 was charged 3 items; 500s were charged."""
    from fastapi.testclient import TestClient

    from ipshield.serve.app import create_app
    from ipshield.serve.backend import StubBackend
    from ipshield.serve.settings import ServeSettings

    class Failing(StubBackend):
        def embed_texts(self, texts):
            if "explode" in texts:
                raise RuntimeError("boom")
            return super().embed_texts(texts)

    db = f"sqlite:///{tmp_path}/c.db"
    engine = open_db(db)
    key, rec = KeyStore(engine).create("c", rate=100000, quota=4)
    app = create_app(ServeSettings(db=db, model="stub", watermark=False), backend=Failing(32), engine=engine)
    img = b64(png(np.zeros((8, 8, 3), np.uint8)))
    with TestClient(app, raise_server_exceptions=False) as client:
        h = {"Authorization": f"Bearer {key}"}
        r = client.post("/v1/embeddings", headers=h, json={"input": [{"image": img}] * 3 + ["a", "b"]})
        assert r.status_code == 429  # 5 items on a quota of 4: nothing served, nothing charged
        assert ledger(engine, rec.key_id)[:2] == (0, 0)
        r = client.post("/v1/embed/texts", headers=h, json={"texts": ["explode"]})
        assert r.status_code == 500
        assert ledger(engine, rec.key_id)[:2] == (0, 0)
        r = client.post("/v1/embeddings", headers=h, json={"input": [{"image": img}] * 2 + ["a", "b"]})
        assert r.status_code == 200 and ledger(engine, rec.key_id)[:2] == (4, 4)
        # 422s name neither unknown fields nor values (a key pasted as a field name stays unseen)
        r = client.post("/v1/embed/texts", headers=h, json={"texts": ["a"], key: 1, "ipsk_zzz": "secret-value"})
        assert r.status_code == 422 and key not in r.text and "ipsk_zzz" not in r.text and "secret-value" not in r.text


def test_a_connection_flood_over_the_descriptor_limit(tmp_path):
    """Old service: under a 256-descriptor limit, 300 slow clients made normal requests time out
    and wrote 53 MB of "Too many open files" tracebacks in 12 s."""
    import resource

    db = f"sqlite:///{tmp_path}/f.db"
    key, _ = KeyStore(open_db(db)).create("flood", rate=100000)
    port = free_port()
    log = tmp_path / "server.log"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--model", "stub:16", "--db", db, "--host", LOOPBACK,
                             "--port", str(port), "--no-watermark", "--body-timeout", "2"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=limit)
    url = f"http://{LOOPBACK}:{port}"
    slow, tries = [], []
    try:
        wait_up([(proc, url)])
        for _ in range(300):
            try:
                c = socket.create_connection((LOOPBACK, port), timeout=2)
                c.sendall(b"POST /v1/embed/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode() + b"{")
                slow.append(c)
            except OSError:
                pass
        t0 = time.time()
        # a well-behaved client: a 503 (e.g. the key store could not open a descriptor while the flood
        # holds them all) says "retry shortly"; the slow clients' body deadline (2 s) frees them
        while True:
            r = httpx.post(url + "/v1/embed/texts", headers={"Authorization": f"Bearer {key}"}, json={"texts": ["hi"]},
                           timeout=30)
            tries.append(r.status_code)
            if r.status_code != 503 or time.time() - t0 > 15:
                break
            assert r.json()["error"]["code"] in ("storage_unavailable", "server_busy"), r.text
            time.sleep(0.5)
        assert r.status_code == 200, (tries, r.text)
        assert time.time() - t0 < 15  # at worst it waited for the slow clients' body deadline
    finally:
        for c in slow:
            c.close()
        stop([proc])
    text = log.read_text()
    print(f"\nflood: {len(slow)} slow connections accepted of 300; answers {tries}; server log {len(text)} bytes; "
          f"{text.count('event loop:')} event-loop error lines")
    assert "Traceback" not in text
    assert len(text) < 200_000, len(text)


def test_metrics_endpoint_needs_an_owner_key_and_counts(tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from ipshield.serve.app import create_app
    from ipshield.serve.backend import StubBackend
    from ipshield.serve.settings import ServeSettings

    db = f"sqlite:///{tmp_path}/m.db"
    engine = open_db(db)
    store = KeyStore(engine)
    key, _ = store.create("acme", rate=100000)
    owner, _ = store.create("owner", rate=100000, admin=True)
    app = create_app(ServeSettings(db=db, model="stub", watermark=False), backend=StubBackend(32), engine=engine)
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            assert client.post("/v1/embed/texts", headers=h, json={"texts": ["a", "b"]}).status_code == 200
        assert client.post("/v1/embed/texts", headers=h, json={"texts": []}).status_code == 422
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=h).status_code == 403
        r = client.get("/metrics", headers={"Authorization": f"Bearer {owner}"})
        assert r.status_code == 200
    text = r.text
    assert key not in text and owner not in text and "ipsk_" not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    served = {s.labels["customer"]: s.value for s in fams["ipshield_served_items"].samples if s.name.endswith("_total")}
    assert served.get("acme") == 6
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in fams["ipshield_requests"].samples if s.name.endswith("_total")}
    assert reqs[("/v1/embed/texts", "200")] == 3 and reqs[("/v1/embed/texts", "422")] == 1
    sizes = [s for s in fams["ipshield_batch_size"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in sizes) >= 1
    assert "ipshield_extraction_flag" in fams or "ipshield_extraction_flag" in text
