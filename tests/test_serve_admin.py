"""The owner's page (``/admin``, ``/admin/api/summary``) and the suspect monitor (``ipshield monitor
run|report``): access, content, escaping, the page in headless Chromium, the suspects file's
errors, and one monitor round against a watermarked and a clean server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

from ipshield.serve.app import create_app
from ipshield.serve.backend import StubBackend
from ipshield.serve.db import open_db, suspect_checks
from ipshield.serve.server import ServerThread, free_port
from ipshield.serve.settings import ServeSettings
from ipshield.serve.store import KeyStore, hash_key

EVIL = '<script>alert("x")</script>&<b>'


def _get(url: str, key: str | None, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=timeout)


# ----------------------------------------------------------------------------- a stub service
@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    d = tmp_path_factory.mktemp("admin")
    url = f"sqlite:///{d}/svc.db"
    engine = open_db(url)
    store = KeyStore(engine)
    keys, recs = {}, {}
    keys["owner"], recs["owner"] = store.create("owner", rate=1000, admin=True)
    keys["acme"], recs["acme"] = store.create("acme", rate=1000, quota=500)
    keys["globex"], recs["globex"] = store.create("globex")
    keys["gone"], recs["gone"] = store.create("gone", rate=1000)
    store.revoke(recs["gone"].key_id)
    with engine.begin() as conn:  # a check whose name and note would be markup if not escaped
        conn.execute(suspect_checks.insert().values(suspect=EVIL, checked_at=time.time() - 60, scheme="vlpmarker",
                                                    verdict="error", queries=0, detail="not reachable " + EVIL))
        conn.execute(suspect_checks.insert().values(suspect="shady-api", checked_at=time.time(), scheme="vlpmarker",
                                                    verdict="stolen", p_trigger=1.5e-12, p_distribution=3e-9, queries=496,
                                                    customer="acme", detail="p=3e-12"))
    settings = ServeSettings(db=url, model="stub", watermark=False, flush_interval_s=0, batch_max_wait_ms=2)
    app = create_app(settings, backend=StubBackend(32), engine=engine)
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/v1/embed/texts", headers={"Authorization": f"Bearer {keys['acme']}"},
                       json={"texts": ["a red car", "a blue boat", "a cat"]}, timeout=30)
        assert r.status_code == 200, r.text
        yield {"url": srv.url, "keys": keys, "recs": recs, "engine": engine, "dir": d}


def test_admin_needs_an_owner_key(stub):
    for path in ("/admin", "/admin/api/summary"):
        r = _get(stub["url"] + path, None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = _get(stub["url"] + path, stub["keys"]["acme"])
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        r = _get(stub["url"] + path, stub["keys"]["gone"])
        assert r.status_code == 401
        r = _get(stub["url"] + path, stub["keys"]["owner"])
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store" and "default-src 'none'" in r.headers["content-security-policy"]


def test_admin_page_shows_keys_usage_and_checks_without_secrets(stub):
    r = _get(stub["url"] + "/admin", stub["keys"]["owner"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for name, rec in stub["recs"].items():
        assert rec.key_id in page and rec.customer in page
    for raw in stub["keys"].values():  # no key, no secret part, no hash
        assert raw not in page and raw.split("_", 2)[2] not in page and hash_key(raw) not in page
    assert "revoked" in page and "owner" in page and "(default)" in page and "500" in page
    # the usage of the last 24 h: acme's 3 texts
    assert '<table id="keys"' in page and '<table id="usage"' in page and '<table id="checks"' in page
    # every value escaped: the suspect's name is text, not markup; no script at all
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "shady-api" in page and "stolen" in page and "1.5e-12" in page
    # the JSON has the same data
    s = _get(stub["url"] + "/admin/api/summary", stub["keys"]["owner"]).json()
    by_id = {k["key_id"]: k for k in s["keys"]}
    assert set(by_id) == {rec.key_id for rec in stub["recs"].values()}
    acme = by_id[stub["recs"]["acme"].key_id]
    assert acme["customer"] == "acme" and acme["used"] == 3 and acme["quota"] == 500 and "rate" not in acme["defaults"]
    assert by_id[stub["recs"]["gone"].key_id]["status"] == "revoked" and by_id[stub["recs"]["owner"].key_id]["admin"]
    use = {u["key_id"]: u for u in s["usage"]}
    assert use[stub["recs"]["acme"].key_id]["items"] == 3 and s["usage_totals"]["items"] == 3
    assert [c["suspect"] for c in s["suspect_checks"] if not c["suspect"].startswith("loop-")] == ["shady-api", EVIL]  # newest first
    assert s["errors"] == {}
    text = json.dumps(s)
    for raw in stub["keys"].values():
        assert raw not in text and hash_key(raw) not in text


def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(c)
        if p:
            return p
    return None


def test_admin_page_renders_in_headless_chromium(stub, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (/usr/bin/chromium, chromium or chromium-browser on PATH): the page is not rendered")
    page = tmp_path / "admin.html"
    page.write_text(_get(stub["url"] + "/admin", stub["keys"]["owner"]).text, encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    try:
        dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium --dump-dom did not finish within 60 s")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for tid in ("keys", "usage", "checks"):
        assert f'<table id="{tid}"' in html
    assert html.count("<tr>") >= 4 + 4 + 2  # rows of the three tables (parsed, so the markup is well-formed)
    assert stub["recs"]["acme"].key_id in html and "shady-api" in html
    assert "<script" not in html.lower()  # the escaped name stayed text after parsing
    shot = tmp_path / "admin.png"
    try:
        r = subprocess.run([exe, *flags, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", page.as_uri()],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium --screenshot did not finish within 60 s")
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ----------------------------------------------------------------------------- the monitor's loop
class FakeVerifier:
    """Stands in for the watermark verification: a few queries, a fixed report."""

    scheme = "fake"
    max_queries = 64

    def run(self, embedder, customer=None, max_queries=None):
        from types import SimpleNamespace

        embedder.embed_texts(["a", "b", "c"])
        test = SimpleNamespace(p_value=0.5)
        return SimpleNamespace(verdict="not-detected", p_value=0.9, threshold=1e-6, customer_id=None, reasons=[],
                               tests={"trigger": test, "distribution": SimpleNamespace(p_value=float("nan"))})


def test_run_monitor_rounds_storage_and_failures(stub):
    from ipshield.serve.suspects import SuspectSpec, history, run_monitor

    env = {"GOOD_KEY": stub["keys"]["globex"], "BAD_KEY": stub["keys"]["globex"][:-4] + "AAAA"}
    specs = [SuspectSpec(name="loop-ok", url=stub["url"], api_key_env="GOOD_KEY", max_queries=8),
             SuspectSpec(name="loop-refused", url=stub["url"], api_key_env="BAD_KEY"),
             SuspectSpec(name="loop-no-env", url=stub["url"], api_key_env="NOT_THERE")]
    lines: list[str] = []
    t0 = time.monotonic()
    last = run_monitor(stub["engine"], specs, every_s=0.5, rounds=2, verifier=FakeVerifier(), environ=env, log_line=lines.append)
    assert time.monotonic() - t0 >= 0.5  # the second round waited for its turn
    assert len(lines) == 6 and [r["suspect"] for r in last] == ["loop-ok", "loop-refused", "loop-no-env"]
    ok = history(stub["engine"], suspect="loop-ok")
    assert len(ok) == 2 and ok[0]["checked_at"] >= ok[1]["checked_at"]
    assert ok[0]["verdict"] == "not-detected" and ok[0]["queries"] == 3 and ok[0]["p_trigger"] == 0.5
    assert ok[0]["p_distribution"] is None and ok[0]["scheme"] == "fake"
    refused = history(stub["engine"], suspect="loop-refused", limit=1)
    assert len(refused) == 1 and refused[0]["verdict"] == "error" and "refused the key" in refused[0]["detail"]
    no_env = history(stub["engine"], suspect="loop-no-env", limit=1)[0]
    assert no_env["verdict"] == "error" and "NOT_THERE" in no_env["detail"] and no_env["queries"] == 0
    assert "loop-refused: error" in lines[1] and "refused the key" in lines[1]
    text = json.dumps(history(stub["engine"], limit=None)) + "\n".join(lines)
    assert env["GOOD_KEY"] not in text and env["BAD_KEY"] not in text and "Traceback" not in text
    # a stop request ends the loop between checks
    import threading

    stop = threading.Event()
    stop.set()
    assert run_monitor(stub["engine"], specs, every_s=3600, verifier=FakeVerifier(), environ=env, stop=stop) == []


# ----------------------------------------------------------------------------- the suspects file
def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from ipshield.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("content, says", [
    (None, "does not exist"),
    ("- name: a\n  url: [unclosed\n", "not valid YAML"),
    ("name: a\nurl: http://x\n", "not a list"),
    ("- name: a\n  url: http://127.0.0.1:9\n  api_key_env: A\n  apikey: ipsk_leaked\n", "unknown key (apikey)"),
    ("- name: a\n  url: ftp://example.com\n", "not an http(s) URL"),
    ("- name: a\n  url: http://user:pw@example.com\n", "holds credentials"),
    ("- name: a\n  url: http://example.com\n  api_key_env: IPSHIELD_TEST_UNSET_VARIABLE\n", "is not set"),
    ("- name: a\n  url: http://example.com\n  api_key_env: 'ipsk_0123456789ab_" + "x" * 43 + "'\n", "looks like an API key"),
    ("- name: a\n  url: http://example.com\n  max_queries: 0\n", "max_queries"),
    ("- name: a\n  url: http://example.com\n- name: a\n  url: http://example.org\n", "used twice"),
])
def test_monitor_run_reports_a_bad_suspects_file(tmp_path, capsys, monkeypatch, content, says):
    monkeypatch.delenv("IPSHIELD_TEST_UNSET_VARIABLE", raising=False)
    f = tmp_path / "suspects.yaml"
    if content is not None:
        f.write_text(content)
    code, out, err = _run_cli(["monitor", "run", "--suspects", str(f), "--db", f"sqlite:///{tmp_path}/m.db",
                               "--key-file", str(tmp_path / "none.json"), "--watermark", str(tmp_path / "wm"), "--once"], capsys)
    assert code == 2 and says in err and "fix:" in err and "Traceback" not in err, err
    assert "pw@" not in err and "x" * 43 not in err and "ipsk_leaked" not in err  # values are never echoed


# ----------------------------------------------------------------------------- one monitor round, end to end
@pytest.fixture(scope="module")
def clip_dir(request):
    try:
        return request.getfixturevalue("small_clip_dir")
    except pytest.FixtureLookupError:
        from ipshield.models.tiny_clip import small_clip

        return small_clip("test")


@pytest.fixture(scope="module")
def wm_pair(clip_dir, tmp_path_factory):
    """The small CLIP served with a VLPMarker watermark and the same model served without one (as in
    tests/test_serve.py), on one database that also holds an owner key."""
    import torch

    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import reference_from_synthetic
    from ipshield.watermark.keys import keygen
    from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("wm-monitor")
    adapter = load_clip(clip_dir)
    key_path, key = keygen(d / "master_key.json", int(adapter.embed_dim))
    wm = VLPMarker.fit(adapter, key, reference_from_synthetic(n=240, seed=1),
                       VLPMarkerConfig(n_triggers=96, steps=150, n_utility=128))
    wm.save(d / "wm")
    url = f"sqlite:///{d}/svc.db"
    store = KeyStore(open_db(url))
    k_acme, _ = store.create("acme", rate=1000)
    k_globex, _ = store.create("globex", rate=1000)
    k_owner, _ = store.create("owner", rate=1000, admin=True)
    on = create_app(ServeSettings(model=str(clip_dir), db=url, key_file=str(key_path), watermark_dir=str(d / "wm"), watermark=True))
    off = create_app(ServeSettings(model=str(clip_dir), db=url, watermark=False))
    with ServerThread(on) as s_on, ServerThread(off) as s_off:
        yield {"dir": d, "db": url, "on": s_on.url, "off": s_off.url, "acme": k_acme, "globex": k_globex,
               "owner": k_owner, "key_path": key_path, "wm": d / "wm", "clip": clip_dir,
               "key_hex": json.loads(key_path.read_text())["secret_hex"]}


def test_monitor_once_against_a_watermarked_and_a_clean_server(wm_pair, tmp_path, capsys, monkeypatch):
    s = wm_pair
    monkeypatch.setenv("IPSHIELD_TEST_THIEF_KEY", s["globex"])
    monkeypatch.setenv("IPSHIELD_TEST_INNOCENT_KEY", s["acme"])
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    suspects = tmp_path / "suspects.yaml"
    suspects.write_text(
        f"- name: thief\n  url: {s['on']}\n  api_key_env: IPSHIELD_TEST_THIEF_KEY\n  max_queries: 512\n"
        f"- name: innocent\n  url: {s['off']}\n  api_key_env: IPSHIELD_TEST_INNOCENT_KEY\n  api: openai\n"
        f"- name: thief-checked\n  url: {s['on']}\n  api_key_env: IPSHIELD_TEST_THIEF_KEY\n  customer: globex\n"
        f"- name: gone-dark\n  url: {dead}\n  api_key_env: IPSHIELD_TEST_THIEF_KEY\n  max_queries: 512\n")
    t0 = time.time()
    code, out, err = _run_cli(["monitor", "run", "--suspects", str(suspects), "--db", s["db"], "--key-file", str(s["key_path"]),
                               "--watermark", str(s["wm"]), "--clean-model", str(s["clip"]), "--customers", "acme,globex",
                               "--once", "--max-queries", "512", "--timeout", "10"], capsys)
    assert code == 0, err
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 4 and "thief: stolen" in lines[0] and "innocent: not-detected" in lines[1], out
    assert "thief-checked: stolen" in lines[2] and "gone-dark: error" in lines[3] and "cannot reach" in lines[3], out

    from ipshield.serve.suspects import history

    rows = {r["suspect"]: r for r in history(open_db(s["db"]))}
    assert set(rows) == {"thief", "innocent", "thief-checked", "gone-dark"}
    assert all(r["checked_at"] >= t0 - 1 and r["scheme"] == "vlpmarker" for r in rows.values())
    thief, innocent, dark = rows["thief"], rows["innocent"], rows["gone-dark"]
    assert thief["verdict"] == "stolen" and thief["customer"] == "globex" and 0 < thief["queries"] <= 512
    # the test-sized watermark (96 triggers, 150 steps) is found by the distribution test; the
    # trigger test's p-value is stored whatever it says
    assert thief["p_distribution"] is not None and thief["p_distribution"] < 1e-6 and 0 <= thief["p_trigger"] <= 1
    checked = rows["thief-checked"]  # one customer's watermark (``verify``) instead of identification
    assert checked["verdict"] == "stolen" and checked["customer"] == "globex" and checked["p_distribution"] < 1e-6
    assert innocent["verdict"] == "not-detected" and innocent["customer"] is None and 0 < innocent["queries"] <= 512
    assert 0 <= innocent["p_trigger"] <= 1 and innocent["p_distribution"] > 1e-3
    assert dark["verdict"] == "error" and dark["queries"] <= 32 and dark["p_trigger"] is None
    assert "Traceback" not in (dark["detail"] or "") and len(dark["detail"]) <= 500

    code, table, err = _run_cli(["monitor", "report", "--db", s["db"]], capsys)
    assert code == 0, err
    for name, verdict in (("thief", "stolen"), ("innocent", "not-detected"), ("thief-checked", "stolen"), ("gone-dark", "error")):
        assert name in table and verdict in table
    assert f"{thief['p_distribution']:.3g}" in table and f"{innocent['p_trigger']:.3g}" in table and "globex" in table
    code, js, err = _run_cli(["monitor", "report", "--db", s["db"], "--suspect", "thief", "--json"], capsys)
    assert code == 0 and [r["verdict"] for r in json.loads(js)] == ["stolen"]

    page = _get(s["on"] + "/admin", s["owner"]).text
    for name in ("thief-checked", "innocent", "gone-dark", "stolen", "not-detected", "cannot reach",
                 f"{thief['p_distribution']:.3g}", f"{innocent['p_trigger']:.3g}"):
        assert name in page
    stored = json.dumps(history(open_db(s["db"])))
    for secret in (s["acme"], s["globex"], s["owner"], s["key_hex"]):
        assert secret not in page and secret not in stored and secret not in out and secret not in table
