"""The embedding service against the real server on loopback (uvicorn in a thread, and once as a
subprocess through the CLI): keys, limits, bad input, audit, monitor, batching, the HTTP suspect
client, the schema fuzz, PostgreSQL (skips when unavailable)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ipshield.serve.app import create_app
from ipshield.serve.backend import MatrixTransform, StubBackend, seeded_orthogonal
from ipshield.serve.client import HTTPSuspect, QueryBudgetExceeded, SuspectError
from ipshield.serve.db import open_db
from ipshield.serve.monitor import MonitorConfig, report
from ipshield.serve.server import LOOPBACK, ServerThread, free_port
from ipshield.serve.settings import ServeSettings
from ipshield.serve.store import KeyStore

DIM = 32
SECRET = b"test-master-secret-0123456789abcdef"
BOOM = "SECRET-MARKER-7f3a"  # text that makes the backend fail, with a "secret" in the exception
MAX_BATCH = 8
MAX_BYTES = 64 * 1024
MAX_PIXELS = 512 * 512
MAX_TEXT = 100


class FailingStub(StubBackend):
    def embed_texts(self, texts):
        if any(t == "explode" for t in texts):
            raise RuntimeError(f"model failure holding {BOOM} and a matrix {np.eye(3)}")
        return super().embed_texts(texts)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
            if record.exc_info:
                self.lines.append("Traceback (exc_info)")
        except Exception:
            self.lines.append("unformattable record")


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise_image(seed: int, h: int = 24, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_with_header_size(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's header)."""
    raw = bytearray(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    raw[16:20] = w.to_bytes(4, "big")
    raw[20:24] = h.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return bytes(raw)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """One running server with a stand-in backend, a per-customer orthogonal transform, small
    limits, and every log record captured."""
    d = tmp_path_factory.mktemp("serve")
    url = f"sqlite:///{d}/service.db"
    engine = open_db(url)
    store = KeyStore(engine)
    keys = {}
    keys["main"], _ = store.create("acme", rate=1000)
    keys["other"], _ = store.create("globex", rate=1000)
    keys["rate"], _ = store.create("slowco", rate=1.0, burst=2)
    keys["quota"], _ = store.create("tiny", rate=1000, quota=5)
    keys["revoked"], rec = store.create("gone", rate=1000)
    store.revoke(rec.key_id)
    keys["thief"], _ = store.create("thief", rate=1000)
    keys["normal"], _ = store.create("shop", rate=1000)
    keys["narrow"], _ = store.create("catalog", rate=1000)
    keys["fuzz"], _ = store.create("fuzzer", rate=100000)
    settings = ServeSettings(db=url, model="stub", watermark=False, max_batch=MAX_BATCH, max_image_bytes=MAX_BYTES,
                             max_image_pixels=MAX_PIXELS, max_text_chars=MAX_TEXT, max_request_bytes=2 * 1024 * 1024,
                             flush_interval_s=0, batch_max_wait_ms=5)
    backend = FailingStub(DIM, delay_ms=10)
    transform = MatrixTransform(lambda c: seeded_orthogonal(SECRET, c, DIM))
    cap = Capture()
    cap.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(cap)
    saved = {n: logging.getLogger(n).level for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "ipshield")}
    for n in saved:
        logging.getLogger(n).setLevel(logging.DEBUG)
    app = create_app(settings, backend=backend, transform=transform, engine=engine)
    srv = ServerThread(app).start()
    bodies: list[str] = []
    yield {"url": srv.url, "keys": keys, "engine": engine, "app": app, "backend": backend, "transform": transform,
           "logs": cap, "bodies": bodies, "db": url, "store": store}
    srv.stop()
    root.removeHandler(cap)
    for n, lvl in saved.items():
        logging.getLogger(n).setLevel(lvl)


def call(svc, method: str, path: str, key: str | None = "main", **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {svc['keys'].get(key, key)}")
    r = httpx.request(method, svc["url"] + path, headers=headers, timeout=30, **kw)
    svc["bodies"].append(r.text)
    assert "traceback" not in r.text.lower()
    return r


def assert_error(r: httpx.Response, status: int | tuple, code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- basics
def test_health_docs_and_embeddings(svc):
    h = call(svc, "GET", "/health", key=None).json()
    assert h["status"] == "ok" and h["dim"] == DIM
    assert call(svc, "GET", "/docs", key=None).status_code == 200
    spec = call(svc, "GET", "/openapi.json", key=None).json()
    assert {"/v1/embed/images", "/v1/embed/images/upload", "/v1/embed/texts", "/v1/embeddings"} <= set(spec["paths"])

    imgs = [noise_image(1), noise_image(2, 40, 17)]
    r = call(svc, "POST", "/v1/embed/images", json={"images": [b64(png_bytes(x)) for x in imgs]})
    assert r.status_code == 200, r.text
    e = np.array(r.json()["embeddings"])
    assert e.shape == (2, DIM) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    # served = normalise(clean @ W_customer): exactly what the backend and the transform give
    clean = svc["backend"].embed_images(imgs)
    w = seeded_orthogonal(SECRET, "acme", DIM)
    assert np.allclose(e, clean @ w, atol=1e-5)
    assert abs(float((e * clean).sum(1).mean())) < 0.5  # far from the clean vectors

    # multipart upload and data URLs give the same vectors; JPEG accepted
    up = call(svc, "POST", "/v1/embed/images/upload", files=[("files", (f"{i}.png", png_bytes(x), "image/png")) for i, x in enumerate(imgs)])
    assert up.status_code == 200 and np.allclose(np.array(up.json()["embeddings"]), e, atol=1e-6)
    du = call(svc, "POST", "/v1/embed/images", json={"images": ["data:image/png;base64," + b64(png_bytes(imgs[0]))]})
    assert np.allclose(du.json()["embeddings"][0], e[0], atol=1e-6)
    assert call(svc, "POST", "/v1/embed/images", json={"images": [b64(png_bytes(imgs[0], "JPEG"))]}).status_code == 200

    t = call(svc, "POST", "/v1/embed/texts", json={"texts": ["a photo of a cat", "a photo of a dog"]})
    assert t.status_code == 200 and np.array(t.json()["embeddings"]).shape == (2, DIM)


def test_customers_get_different_watermarks_same_geometry(svc):
    imgs = [b64(png_bytes(noise_image(s))) for s in range(3)]
    texts = ["one thing", "another thing", "a third"]
    out = {}
    for k in ("main", "other"):
        ei = np.array(call(svc, "POST", "/v1/embed/images", key=k, json={"images": imgs}).json()["embeddings"])
        et = np.array(call(svc, "POST", "/v1/embed/texts", key=k, json={"texts": texts}).json()["embeddings"])
        out[k] = (ei, et)
    # different customers are served different vectors for the same input ...
    assert np.abs((out["main"][0] * out["other"][0]).sum(1)).max() < 0.8
    # ... but every image-text cosine is the same (orthogonal transforms): utility is unchanged
    assert np.allclose(out["main"][0] @ out["main"][1].T, out["other"][0] @ out["other"][1].T, atol=1e-5)


def test_openai_alias_and_http_client(svc):
    imgs = np.stack([noise_image(10), noise_image(11)])
    float_imgs = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    texts = ["a red square", "a blue circle", "three"]
    key = svc["keys"]["main"]
    with HTTPSuspect(svc["url"], key, schema="ipshield", budget=100, batch_size=2) as a, \
            HTTPSuspect(svc["url"], key, schema="openai", budget=100) as b:
        ia, ta = a.embed_images(float_imgs), a.embed_texts(texts)
        ib, tb = b.embed_images(float_imgs), b.embed_texts(texts)
        assert ia.shape == (2, DIM) and tb.shape == (3, DIM)
        assert np.allclose(ia.numpy(), ib.numpy(), atol=1e-6) and np.allclose(ta.numpy(), tb.numpy(), atol=1e-6)
        assert a.queries == 5 and a.requests == 3  # 2 images in 1 request, 3 texts in 2 requests
        assert key not in repr(a)
    r = call(svc, "POST", "/v1/embeddings", json={"input": "hello", "model": "x"}).json()
    assert r["object"] == "list" and r["data"][0]["index"] == 0 and len(r["data"][0]["embedding"]) == DIM
    with HTTPSuspect(svc["url"], key, budget=3) as c:
        c.embed_texts(["a", "b"])
        with pytest.raises(QueryBudgetExceeded):
            c.embed_texts(["c", "d"])
        assert c.queries == 2
    with HTTPSuspect(svc["url"], "ipsk_000000000000_" + "x" * 43) as c, pytest.raises(SuspectError, match="refused the key"):
        c.embed_texts(["a"])
    with HTTPSuspect(svc["url"] + "/nowhere", key, schema="openai") as c, pytest.raises(SuspectError):
        c.embed_texts(["a"])


# ----------------------------------------------------------------------------- auth and limits
def test_auth_errors(svc):
    body = {"texts": ["x"]}
    assert_error(call(svc, "POST", "/v1/embed/texts", key=None, json=body), 401, "missing_api_key")
    assert_error(call(svc, "POST", "/v1/embed/texts", key="nonsense", json=body), 401, "invalid_api_key")
    forged = svc["keys"]["main"][:-4] + "AAAA"  # right id, wrong secret
    assert_error(call(svc, "POST", "/v1/embed/texts", key=forged, json=body), 401, "invalid_api_key")
    assert_error(call(svc, "POST", "/v1/embed/texts", key="revoked", json=body), 401, "revoked_api_key")
    # X-API-Key works too
    r = call(svc, "POST", "/v1/embed/texts", key=None, headers={"X-API-Key": svc["keys"]["main"]}, json=body)
    assert r.status_code == 200


def test_rate_limit_and_quota(svc):
    codes = [call(svc, "POST", "/v1/embed/texts", key="rate", json={"texts": ["x"]}).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]
    r = call(svc, "POST", "/v1/embed/texts", key="rate", json={"texts": ["x"]})
    err = assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1 and "rate limit" in err["message"]
    time.sleep(1.1)  # one token refilled
    assert call(svc, "POST", "/v1/embed/texts", key="rate", json={"texts": ["x"]}).status_code == 200

    assert call(svc, "POST", "/v1/embed/texts", key="quota", json={"texts": ["a", "b", "c"]}).status_code == 200
    assert_error(call(svc, "POST", "/v1/embed/texts", key="quota", json={"texts": ["a", "b", "c"]}), 429, "quota_exceeded")
    assert call(svc, "POST", "/v1/embed/texts", key="quota", json={"texts": ["a", "b"]}).status_code == 200  # exactly 5
    assert_error(call(svc, "POST", "/v1/embed/texts", key="quota", json={"texts": ["a"]}), 429, "quota_exceeded")
    u = call(svc, "GET", "/v1/usage", key="quota").json()
    assert u["used"] == 5 and u["quota"] == 5
    rec = [r for r in svc["store"].list() if r.customer == "tiny"][0]
    assert rec.used == 5  # written to the database (flush on every request in this fixture)


# ----------------------------------------------------------------------------- bad input
def _bad_inputs():
    big_noise = noise_image(3, 200, 200)  # ~120 KB as PNG: over the 64 KB byte limit
    bomb = png_bytes(np.zeros((3000, 3000, 3), np.uint8))  # 9 Mpx of zeros: a few KB
    gif_bomb = io.BytesIO()
    Image.new("P", (4000, 4000)).save(gif_bomb, format="GIF")
    trunc = png_bytes(noise_image(4, 64, 64))[:200]
    J = "application/json"
    return {
        "corrupt image": ("/v1/embed/images", {"json": {"images": [b64(os.urandom(500))]}}, 400, "bad_image"),
        "truncated png": ("/v1/embed/images", {"json": {"images": [b64(trunc)]}}, 400, "bad_image"),
        "not base64": ("/v1/embed/images", {"json": {"images": ["%%%not-base64%%%"]}}, 400, "bad_base64"),
        "tiff not allowed": ("/v1/embed/images", {"json": {"images": [b64(png_bytes(noise_image(5), "TIFF"))]}}, 400, "bad_image"),
        "image over byte limit": ("/v1/embed/images", {"json": {"images": [b64(png_bytes(big_noise))]}}, 413, "image_too_large"),
        "upload over byte limit": ("/v1/embed/images/upload", {"files": [("files", ("a.png", png_bytes(big_noise), "image/png"))]}, 413, "image_too_large"),
        "decompression bomb png": ("/v1/embed/images", {"json": {"images": [b64(bomb)]}}, 413, "image_too_many_pixels"),
        "bomb header 60000x60000": ("/v1/embed/images", {"json": {"images": [b64(png_with_header_size(60000, 60000))]}}, 413, "image_too_many_pixels"),
        "gif bomb upload": ("/v1/embed/images/upload", {"files": [("files", ("a.gif", gif_bomb.getvalue(), "image/gif"))]}, 413, "image_too_many_pixels"),
        "wrong content type": ("/v1/embed/texts", {"content": b"texts=a", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        "json to upload": ("/v1/embed/images/upload", {"json": {"images": []}}, 415, "unsupported_media_type"),
        "multipart to json": ("/v1/embed/images", {"files": [("files", ("a.png", b"x", "image/png"))]}, 415, "unsupported_media_type"),
        "malformed json": ("/v1/embed/texts", {"content": b'{"texts": [', "headers": {"content-type": J}}, 422, None),
        "wrong type": ("/v1/embed/texts", {"json": {"texts": "not a list"}}, 422, "invalid_request"),
        "unknown field": ("/v1/embed/texts", {"json": {"texts": ["a"], "extra": 1}}, 422, "invalid_request"),
        "empty image batch": ("/v1/embed/images", {"json": {"images": []}}, 422, "empty_batch"),
        "empty text batch": ("/v1/embed/texts", {"json": {"texts": []}}, 422, "empty_batch"),
        "empty openai input": ("/v1/embeddings", {"json": {"input": []}}, 422, "empty_batch"),
        "image batch over limit": ("/v1/embed/images", {"json": {"images": [b64(png_bytes(noise_image(6, 4, 4)))] * (MAX_BATCH + 1)}}, 413, "batch_too_large"),
        "text batch over limit": ("/v1/embed/texts", {"json": {"texts": ["a"] * (MAX_BATCH + 1)}}, 413, "batch_too_large"),
        "text over length": ("/v1/embed/texts", {"json": {"texts": ["x" * (MAX_TEXT + 1)]}}, 413, "text_too_long"),
        "lone surrogate": ("/v1/embed/texts", {"content": b'{"texts": ["\\ud800"]}', "headers": {"content-type": J}}, 422, None),
        "body over request limit": ("/v1/embed/texts", {"content": b"x" * (3 * 1024 * 1024), "headers": {"content-type": J}}, 413, "request_too_large"),
        "openai bad encoding": ("/v1/embeddings", {"json": {"input": "a", "encoding_format": "base64"}}, 422, "bad_encoding_format"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_4xx(svc, name):
    path, kw, status, code = BAD[name]
    r = call(svc, "POST", path, **kw)
    assert_error(r, status, code)


def test_unknown_routes_and_methods_are_json(svc):
    assert_error(call(svc, "GET", "/nope"), 404)
    assert_error(call(svc, "GET", "/v1/embed/texts"), 405)


def test_internal_error_is_generic_and_not_logged_with_internals(svc):
    before = len(svc["logs"].lines)
    r = call(svc, "POST", "/v1/embed/texts", json={"texts": ["explode"]})
    err = assert_error(r, 500, "internal_error")
    assert err["message"] == "internal server error" and BOOM not in r.text
    new = "\n".join(svc["logs"].lines[before:])
    assert "RuntimeError" in new  # the type is logged ...
    assert BOOM not in new and "Traceback" not in new  # ... not the message or a traceback
    # the server keeps serving
    assert call(svc, "POST", "/v1/embed/texts", json={"texts": ["fine"]}).status_code == 200


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_are_micro_batched(svc):
    stats = svc["app"].state.service.batcher.stats
    b0, r0 = stats["batches"], stats["requests"]
    key = svc["keys"]["main"]
    imgs = [b64(png_bytes(noise_image(100 + i))) for i in range(16)]

    async def go():
        async with httpx.AsyncClient(base_url=svc["url"], headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            rs = await asyncio.gather(*[c.post("/v1/embed/images", json={"images": [im]}) for im in imgs])
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    single = [call(svc, "POST", "/v1/embed/images", json={"images": [im]}).json()["embeddings"][0] for im in imgs[:3]]
    assert np.allclose([r.json()["embeddings"][0] for r in rs[:3]], single, atol=1e-6)  # batching changes nothing
    batches, reqs = stats["batches"] - b0, stats["requests"] - r0
    assert reqs == 16 + 3 and batches < reqs - 4, stats


# ----------------------------------------------------------------------------- audit and monitor
def test_audit_counts_and_extraction_monitor(svc):
    k = svc["keys"]
    base = noise_image(7, 24, 24).astype(np.int16)
    rng = np.random.default_rng(0)
    # thief: 320 distinct random images in 40 requests
    for i in range(40):
        batch = [b64(png_bytes(noise_image(1000 + 8 * i + j))) for j in range(8)]
        assert call(svc, "POST", "/v1/embed/images", key="thief", json={"images": batch}).status_code == 200
    # normal client: the same 6 catalogue images over and over
    cat = [b64(png_bytes(noise_image(50 + j))) for j in range(6)]
    for i in range(40):
        batch = [cat[(i + j) % 6] for j in range(8)]
        assert call(svc, "POST", "/v1/embed/images", key="normal", json={"images": batch}).status_code == 200
    # narrow client: distinct images, all small variations of one picture (one domain)
    for i in range(40):
        batch = [b64(png_bytes(np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8))) for _ in range(8)]
        assert call(svc, "POST", "/v1/embed/images", key="narrow", json={"images": batch}).status_code == 200

    reps = {r.customer: r for r in report(svc["engine"], MonitorConfig(volume_items=300, min_items=100))}
    thief, normal, narrow = reps["thief"], reps["shop"], reps["catalog"]
    assert (thief.requests, thief.items) == (40, 320) and (normal.requests, normal.items) == (40, 320)
    assert thief.unique == 1.0 and normal.unique < 0.1 and narrow.unique == 1.0
    assert thief.spread > 0.8 and narrow.spread < 0.35
    assert thief.verdict == "suspect" and set(thief.flags) >= {"volume", "diversity"}
    assert normal.verdict != "suspect" and "diversity" not in normal.flags
    assert narrow.verdict != "suspect" and "diversity" not in narrow.flags
    assert reps["slowco"].rejected >= 2 and reps["tiny"].rejected >= 2
    assert reps["gone"].rejected >= 1


# ----------------------------------------------------------------------------- fuzz
def test_schema_fuzz_finds_no_5xx(svc, tmp_path):
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    cmd = [str(st), "run", f"{svc['url']}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
           "--seed", "1", "-H", f"Authorization: Bearer {svc['keys']['fuzz']}", "--request-timeout", "20",
           "--generation-database", "none", "--report-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    if os.environ.get("IPSHIELD_SHOW_FUZZ"):
        print(out)


# ----------------------------------------------------------------------------- the CLI and the subprocess server
CLI = "import sys; from ipshield.cli import main; main(sys.argv[1:])"


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_keys_cli_and_cli_server_lifecycle(tmp_path):
    db = f"sqlite:///{tmp_path}/k.db"
    made = _cli("keys", "create", "--db", db, "--customer", "acme", "--quota", "50")
    assert made.returncode == 0, made.stderr
    raw = [l.split()[-1] for l in made.stdout.splitlines() if l.startswith("api key:")][0]
    key_id = [l.split()[-1] for l in made.stdout.splitlines() if l.startswith("key id:")][0]
    listed = _cli("keys", "list", "--db", db)
    assert key_id in listed.stdout and raw not in listed.stdout and "active" in listed.stdout
    # the raw key is stored nowhere
    assert raw.encode() not in Path(f"{tmp_path}/k.db").read_bytes()
    bad = _cli("keys", "create", "--db", db, "--customer", "no spaces allowed")
    assert bad.returncode == 2 and "invalid customer" in bad.stderr and "Traceback" not in bad.stderr

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--model", "stub:16", "--db", db, "--host", LOOPBACK,
                             "--port", str(port), "--no-watermark", "--max-batch", "4"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://{LOOPBACK}:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        h = {"Authorization": f"Bearer {raw}"}
        assert httpx.post(url + "/v1/embed/texts", headers=h, json={"texts": ["a", "b"]}).status_code == 200
        bomb = png_with_header_size(30000, 30000)
        r = httpx.post(url + "/v1/embed/images", headers=h, json={"images": [b64(bomb)]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_many_pixels"
        assert httpx.post(url + "/v1/embed/texts", headers={"Authorization": "Bearer " + raw[:-1] + "x"}, json={"texts": ["a"]}).status_code == 401
        rv = _cli("keys", "revoke", key_id, "--db", db)
        assert rv.returncode == 0 and "revoked" in rv.stdout
        r = httpx.post(url + "/v1/embed/texts", headers=h, json={"texts": ["a"]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "POST /v1/embed/texts" in text  # the access log is there ...
    assert raw not in text and raw[18:] not in text and "Traceback" not in text  # ... without the key
    rep = _cli("keys", "report", "--db", db, "--json")
    row = [r for r in json.loads(rep.stdout) if r["key_id"] == key_id][0]
    assert row["requests"] == 1 and row["items"] == 2 and row["revoked"] and row["rejected"] >= 1  # flushed at shutdown
    table = _cli("keys", "report", "--db", db)
    assert key_id in table.stdout and "verdict" in table.stdout


def test_migration_upgrades_an_old_database(tmp_path):
    from sqlalchemy import inspect, text

    from ipshield.serve.db import MIGRATIONS, make_engine, migrate, schema_table

    url = f"sqlite:///{tmp_path}/old.db"
    eng = make_engine(url)
    with eng.begin() as c:  # a version-1 database, as an old ipshield left it
        schema_table.create(c)
        MIGRATIONS[0][2](c)
        c.execute(schema_table.insert().values(version=1, description="v1", applied_at=0.0))
        c.execute(text("INSERT INTO api_keys (key_id, key_hash, customer, used, created_at) VALUES ('aaaaaaaaaaaa', 'h', 'old', 3, 0)"))
    assert "last_used_at" not in {c["name"] for c in inspect(eng).get_columns("api_keys")}
    assert migrate(eng) == MIGRATIONS[-1][0]
    assert "last_used_at" in {c["name"] for c in inspect(eng).get_columns("api_keys")}
    assert KeyStore(eng).get("aaaaaaaaaaaa").used == 3  # data kept
    assert migrate(eng) == MIGRATIONS[-1][0]  # idempotent


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_url():
    url = os.environ.get("IPSHIELD_TEST_PG_URL", "").strip()
    if not url:
        pytest.skip("PostgreSQL not available: IPSHIELD_TEST_PG_URL is not set (.ci/run sets it when it can start a local server)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    from sqlalchemy import text

    try:
        eng = open_db(url)
        with eng.connect() as c:
            c.execute(text("select 1"))
    except Exception as exc:
        pytest.skip(f"PostgreSQL at IPSHIELD_TEST_PG_URL does not answer ({type(exc).__name__})")
    return url


def test_postgres_path(pg_url):
    engine = open_db(pg_url)
    store = KeyStore(engine)
    raw, rec = store.create(f"pg-{int(time.time() * 1000) % 10**9}", rate=1000, quota=3)
    settings = ServeSettings(db=pg_url, model="stub", watermark=False, flush_interval_s=0)
    app = create_app(settings, backend=StubBackend(DIM), engine=engine)
    with ServerThread(app) as srv:
        h = {"Authorization": f"Bearer {raw}"}
        assert httpx.post(srv.url + "/v1/embed/texts", headers=h, json={"texts": ["a", "b"]}).status_code == 200
        assert httpx.post(srv.url + "/v1/embed/texts", headers=h, json={"texts": ["a", "b"]}).status_code == 429
        store.revoke(rec.key_id)
        time.sleep(settings.key_cache_s + 0.1)  # a revocation reaches every process within key_cache_s
        assert httpx.post(srv.url + "/v1/embed/texts", headers=h, json={"texts": ["a"]}).status_code == 401
    r = [x for x in report(engine) if x.key_id == rec.key_id][0]
    assert (r.requests, r.items, r.used) == (1, 2, 2) and r.rejected == 2 and r.revoked


# ----------------------------------------------------------------------------- the real model and watermark
@pytest.fixture(scope="module")
def clip_dir(request):
    try:
        return request.getfixturevalue("small_clip_dir")
    except pytest.FixtureLookupError:
        from ipshield.models.tiny_clip import small_clip

        return small_clip("test")


@pytest.fixture(scope="module")
def wm_service(clip_dir, tmp_path_factory):
    """The small CLIP served with a VLPMarker watermark (real adapter, real watermark), and the same
    model served without one (an innocent suspect)."""
    import torch

    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import reference_from_synthetic
    from ipshield.watermark.keys import keygen
    from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("wm")
    adapter = load_clip(clip_dir)
    key_path, key = keygen(d / "master_key.json", int(adapter.embed_dim))
    ref = reference_from_synthetic(n=240, seed=1)
    wm = VLPMarker.fit(adapter, key, ref, VLPMarkerConfig(n_triggers=96, steps=150, n_utility=128))
    wm.save(d / "wm")
    probes = reference_from_synthetic(n=160, seed=7)
    url = f"sqlite:///{d}/svc.db"
    store = KeyStore(open_db(url))
    k_acme, _ = store.create("acme", rate=1000)
    k_other, _ = store.create("globex", rate=1000)
    on = create_app(ServeSettings(model=str(clip_dir), db=url, key_file=str(key_path), watermark_dir=str(d / "wm"), watermark=True))
    off = create_app(ServeSettings(model=str(clip_dir), db=url, watermark=False))
    with ServerThread(on) as s_on, ServerThread(off) as s_off:
        yield {"adapter": adapter, "wm": wm, "probes": probes, "on": s_on.url, "off": s_off.url, "acme": k_acme,
               "other": k_other, "key_path": key_path, "key_hex": json.loads(key_path.read_text())["secret_hex"]}


def test_served_clip_matches_the_watermarked_encoder(wm_service):
    import torch

    from ipshield.watermark.base import CleanEncoder

    s = wm_service
    imgs = (s["probes"].images[:6] * 255).round() / 255  # what survives PNG
    texts = s["probes"].texts[:6]
    enc = s["wm"].encoder(s["adapter"], "acme")
    with HTTPSuspect(s["on"], s["acme"]) as c:
        ei, et = c.embed_images(imgs), c.embed_texts(texts)
    assert torch.allclose(ei, enc.embed_images(imgs), atol=1e-4) and torch.allclose(et, enc.embed_texts(texts), atol=1e-4)
    with HTTPSuspect(s["off"], s["acme"]) as c:
        ci, ct = c.embed_images(imgs), c.embed_texts(texts)
    assert torch.allclose(ci, CleanEncoder(s["adapter"]).embed_images(imgs), atol=1e-4)
    # the served vectors are far from the clean ones (the watermark's utility is tested in test_watermark)
    assert (ei * ci).sum(1).abs().mean() < 0.5


def test_black_box_verification_over_http(wm_service):
    from ipshield.watermark.base import CleanEncoder
    from ipshield.watermark.verify import Suspect, identify_customer, verify

    s = wm_service
    clean = CleanEncoder(s["adapter"])
    # a thief re-serving acme's embeddings: verified as stolen, from the API alone, within 512 queries
    with HTTPSuspect(s["on"], s["acme"], budget=512, batch_size=64) as http:
        rep = verify(s["wm"], Suspect.from_embedder(http), clean, s["probes"], "acme", max_queries=512)
        assert rep.verdict == "stolen" and rep.p_value <= 1e-6, rep.summary()
        assert http.queries == rep.queries["total"] <= 512
    # the same model without the watermark (OpenAI-style schema this time): not detected
    with HTTPSuspect(s["off"], s["acme"], schema="openai", budget=512, batch_size=64) as http:
        rep = verify(s["wm"], Suspect.from_embedder(http), clean, s["probes"], "acme", max_queries=512)
        assert rep.verdict != "stolen" and rep.p_value > 1e-3, rep.summary()
    # the leak is traced to the right customer
    with HTTPSuspect(s["on"], s["other"], budget=512, batch_size=64) as http:
        who = identify_customer(s["wm"], Suspect.from_embedder(http), clean, s["probes"], ["acme", "globex", "initech"], max_queries=512)
        assert who.verdict == "stolen" and who.customer_id == "globex", who.summary()
    text = json.dumps(rep.to_dict())
    assert s["key_hex"] not in text and s["acme"] not in text


def test_verify_cli_against_a_suspect_url(wm_service, clip_dir, tmp_path, capsys):
    from ipshield.cli import main

    s = wm_service
    out = tmp_path / "verify"
    main(["verify", "--suspect-url", s["on"], "--suspect-key", s["acme"], "--key", str(s["key_path"]),
          "--watermark", str(s["key_path"].parent / "wm"), "--clean-model", str(clip_dir), "--customer", "acme",
          "--max-queries", "512", "--out", str(out)])
    said = capsys.readouterr().out
    assert said.startswith("stolen"), said
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["verdict"] == "stolen" and metrics["queries"]["total"] <= 512
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".yaml"))
    assert s["acme"] not in written and s["key_hex"] not in written
    with pytest.raises(SystemExit) as e:  # both a model and a URL: a clear error
        main(["verify", "--model", str(clip_dir), "--suspect-url", s["on"], "--key", str(s["key_path"]),
              "--watermark", str(s["key_path"].parent / "wm"), "--customer", "acme", "--out", str(tmp_path / "x")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- last: nothing secret leaked
def test_no_key_or_matrix_in_any_response_or_log(svc):
    logs = "\n".join(svc["logs"].lines)
    assert "POST /v1/embed" in logs  # the access log was captured
    everything = logs + "\n".join(svc["bodies"])
    for raw in svc["keys"].values():
        assert raw not in everything and raw[18:] not in everything
    w = seeded_orthogonal(SECRET, "acme", DIM)
    for v in w[0, :3]:
        assert f"{v:.6f}"[:8] not in logs
    assert SECRET.decode() not in everything and "Traceback" not in logs and BOOM not in everything
