"""Operator mistakes on `ipshield serve` and `ipshield keys ...`, through the installed executable:
each ends with one message that names the option and the fix, exit status 2, no traceback, and
nothing created or written. Also: `serve` refuses a missing SQLite file unless --create-db, a
read-only database is reported as such, and `serve --workers 2` serves.

The CLI cases run concurrently (each start of the executable imports torch: seconds of CPU)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "ipshield"
if not EXE.is_file() and shutil.which("ipshield"):
    EXE = Path(shutil.which("ipshield"))

needs_exe = pytest.mark.skipif(not EXE.is_file(), reason=f"the ipshield executable is not installed ({EXE}); "
                                                         "run `make setup` (pip install -e .)")
BIGINT_OVER = str(2**63)  # one more than the database's BIGINT holds


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("IPSHIELD_DEBUG", "IPSHIELD_SERVE_SETTINGS", "IPSHIELD_SERVE_LOG_LEVEL"):
        env.pop(k, None)
    env.setdefault("IPSHIELD_CACHE", str(tmp / "cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # click's usage errors wrap at the terminal width
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env(cwd))


def _no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


@dataclass(frozen=True)
class Case:
    """``ipshield ARGS`` (``{db}`` = a SQLite URL in the case's own folder, whose file must not be
    created); the output must hold every string of ``says`` (case-insensitive)."""

    args: tuple[str, ...]
    says: tuple[str, ...]


def _serve(*args: str, says: tuple[str, ...]) -> Case:
    # the watermark is off so that the only mistake is the one under test
    return Case(("serve", "--model", "stub", "--no-watermark", "--db", "{db}", *args), says)


def _create(*args: str, says: tuple[str, ...]) -> Case:
    return Case(("keys", "create", "--customer", "acme", "--db", "{db}", *args), says)


FINITE_RATE = ("--rate", "finite", "e.g. --rate")
POSITIVE_RATE = ("--rate", "greater than 0", "e.g. --rate")
CASES = {
    # keys create: limits that would overflow the database or refuse every request
    "keys-quota-2^63": _create("--quota", BIGINT_OVER, says=("--quota", "too large", "9223372036854775807")),
    "keys-quota-2^63-literal": _create("--quota", "2^63", says=("--quota", "integer", "--help")),
    "keys-quota-neg": _create("--quota", "-1", says=("--quota", "0 or more", "e.g. --quota")),
    "keys-burst-0": _create("--burst", "0", says=("--burst", "at least 1", "429", "e.g. --burst")),
    "keys-burst-neg": _create("--burst", "-5", says=("--burst", "at least 1", "e.g. --burst")),
    "keys-burst-nan": _create("--burst", "nan", says=("--burst", "finite", "e.g. --burst")),
    "keys-burst-inf": _create("--burst", "inf", says=("--burst", "finite", "e.g. --burst")),
    "keys-rate-nan": _create("--rate", "nan", says=FINITE_RATE),
    "keys-rate-inf": _create("--rate", "inf", says=FINITE_RATE),
    "keys-rate-0": _create("--rate", "0", says=POSITIVE_RATE),
    "keys-rate-neg": _create("--rate", "-1", says=POSITIVE_RATE),
    # serve: every option checked before a model is loaded or the database opened
    "serve-model-stub-abc": _serve("--model", "stub:abc", says=("--model", "stub:DIM", "e.g. --model stub:64")),
    "serve-max-batch-0": _serve("--max-batch", "0", says=("--max-batch", "at least 1", "e.g. --max-batch 64")),
    "serve-rate-0": _serve("--rate", "0", says=POSITIVE_RATE),
    "serve-rate-neg": _serve("--rate", "-1", says=POSITIVE_RATE),
    "serve-rate-nan": _serve("--rate", "nan", says=FINITE_RATE),
    "serve-rate-inf": _serve("--rate", "inf", says=FINITE_RATE),
    "serve-quota-neg": _serve("--quota", "-1", says=("--quota", "greater than or equal to 0", "leave --quota out")),
    "serve-quota-2^63": _serve("--quota", BIGINT_OVER, says=("--quota", "9223372036854775807")),
    "serve-log-level": _serve("--log-level", "nosuch", says=("--log-level", "nosuch", "--log-level info")),
    "serve-port-0": _serve("--port", "0", says=("--port", "between 1 and 65535")),
    "serve-port-70000": _serve("--port", "70000", says=("--port", "between 1 and 65535")),
    "serve-threads-0": _serve("--threads", "0", says=("--threads", "at least 1")),
    "serve-workers-0": _serve("--workers", "0", says=("--workers", "--workers 1")),
    "serve-body-timeout-0": _serve("--body-timeout", "0", says=("--body-timeout", "greater than 0", "e.g. --body-timeout 30")),
    "serve-body-timeout-nan": _serve("--body-timeout", "nan", says=("--body-timeout", "finite")),
    "serve-max-request-pixels-0": _serve("--max-request-pixels", "0", says=("--max-request-pixels", "at least 1")),
    "serve-device-cuda": _serve("--device", "cuda", says=("cuda", "no cuda gpu", "--device cpu")),
    "serve-device-unknown": _serve("--device", "tpu", says=("--device", "auto, cpu, cuda")),
    "serve-model-folder-missing": _serve("--model", "no/such/clip", says=("--model", "does not exist", "--model stub")),
    "serve-key-file-missing": Case(("serve", "--model", "stub", "--key-file", "no-such-key.json", "--db", "{db}"),
                                   ("--key-file", "does not exist", "--no-watermark")),
    "serve-watermark-without-key": Case(("serve", "--model", "stub", "--db", "{db}"), ("master key", "--key-file")),
    # serve refuses a missing database file instead of creating an empty one (every key 401)
    "serve-missing-db": _serve(says=("does not exist", "ipshield keys create --db", "--create-db")),
    "keys-revoke-missing-db": Case(("keys", "revoke", "abcdefabcdef", "--db", "{db}"), ("does not exist", "keys create")),
}
SKIP = {"serve-device-cuda": "this machine has CUDA"} if _has_cuda() else {}
# The cases run through the installed executable by default: one per kind of check (each start of
# the executable imports torch, seconds of CPU; all of them take minutes on a busy 2-core machine).
# IPSHIELD_TEST_EXE_ALL=1 runs every case through it. Every case also runs in-process below.
EXE_CASES = list(CASES) if os.environ.get("IPSHIELD_TEST_EXE_ALL") else [
    "keys-quota-2^63", "keys-burst-0", "keys-quota-2^63-literal", "serve-model-stub-abc", "serve-rate-nan",
    "serve-port-70000", "serve-device-cuda", "serve-missing-db",
]


def _check(case_id: str, r: subprocess.CompletedProcess, db: Path) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    _no_traceback(r)
    assert "internal error" not in out, out
    for s in CASES[case_id].says:
        assert s.lower() in out.lower(), f"{s!r} missing from:\n{out}"
    assert not db.exists(), f"{db} was created by a command that failed:\n{out}"


def _args(case_id: str, db: Path) -> list[str]:
    return [a.replace("{db}", f"sqlite:///{db}") for a in CASES[case_id].args]


@pytest.fixture(scope="module")
def exe_results(request, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The selected executable cases of this module, run at once (a few at a time)."""
    wanted = []
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if item.module is request.module and cs is not None and "exe_case" in cs.params:
            wanted.append(cs.params["exe_case"])
    wanted = [c for c in dict.fromkeys(wanted) if c not in SKIP]

    dirs = {c: tmp_path_factory.mktemp("case") for c in wanted}  # here: mktemp is not thread-safe

    def one(case_id: str):
        db = dirs[case_id] / "service.db"
        return case_id, (_run(_args(case_id, db), dirs[case_id]), db)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, wanted))


@needs_exe
@pytest.mark.parametrize("exe_case", EXE_CASES)
def test_operator_mistake_via_the_executable(exe_case, exe_results):
    if exe_case in SKIP:
        pytest.skip(SKIP[exe_case])
    _check(exe_case, *exe_results[exe_case])


@pytest.mark.parametrize("case_id", list(CASES))
def test_operator_mistake_in_process(case_id, tmp_path, monkeypatch, capsys):
    """The same through ``ipshield.cli.main`` (what the executable runs), in this process."""
    if case_id in SKIP:
        pytest.skip(SKIP[case_id])
    import ipshield.serve.server as server
    from ipshield.cli import main

    def must_not_serve(*a, **k):
        raise AssertionError("serve started although an option was wrong")

    monkeypatch.setattr(server, "serve_forever", must_not_serve)
    monkeypatch.setenv("COLUMNS", "200")
    for k in ("IPSHIELD_DEBUG", "IPSHIELD_SERVE_SETTINGS", "IPSHIELD_SERVE_LOG_LEVEL"):
        monkeypatch.delenv(k, raising=False)
    db = tmp_path / "service.db"
    args = _args(case_id, db)
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    _check(case_id, subprocess.CompletedProcess(args, code, out, err), db)


# --------------------------------------------------------------------------- read-only database
def _key_db(path: Path) -> str:
    """A SQLite database at ``path`` with one key; returns the key id."""
    from ipshield.serve.db import open_db
    from ipshield.serve.store import KeyStore

    engine = open_db(f"sqlite:///{path}")
    _, rec = KeyStore(engine).create("acme")
    engine.dispose()
    return rec.key_id


def _read_only(path: Path, undo: list) -> None:
    """Make ``path`` (a file or a folder) unwritable, also for root (``chattr +i``); skip if impossible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo.append(lambda: path.chmod(mode))
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root and `chattr +i` is not possible here: no way to make a file read-only")
    undo.append(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True))


@needs_exe
@pytest.mark.parametrize("what", ["file", "folder"])
def test_revoke_on_a_read_only_database(tmp_path, what):
    folder = tmp_path / "dbdir"
    folder.mkdir()
    db = folder / "keys.db"
    key_id = _key_db(db)
    before = db.read_bytes()
    undo: list = []
    try:
        _read_only(db if what == "file" else folder, undo)
        r = _run(["keys", "revoke", key_id, "--db", f"sqlite:///{db}"], tmp_path)
    finally:
        for u in reversed(undo):
            u()
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    _no_traceback(r)
    assert ("read-only" if what == "file" else "not writable") in out, out
    assert "fix:" in out and "writable" in out.split("fix:", 1)[1], out
    assert db.read_bytes() == before
    assert "revoked" not in r.stdout


def test_database_write_errors_are_named_without_sql():
    """The CLI's guard around a write: SQLAlchemy's OperationalError (whose text holds the SQL and
    its parameters) becomes an IPShieldError that says what is wrong and echoes neither."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from ipshield.cli.serve import _writing
    from ipshield.errors import IPShieldError

    secret_sql = "UPDATE api_keys SET revoked_at=? WHERE key_id = 'k' -- postgresql://u:hunter2@h/db"
    with pytest.raises(IPShieldError) as e:
        with _writing("revoke the key"):
            raise OperationalError(secret_sql, ("hunter2",), sqlite3.OperationalError("attempt to write a readonly database"))
    assert "read-only" in e.value.problem and "revoke the key" in e.value.problem and "writable" in e.value.fix
    with pytest.raises(IPShieldError) as e2:
        with _writing("create the key"):
            raise OperationalError(secret_sql, ("hunter2",), sqlite3.OperationalError("disk I/O error"))
    assert "refused the write" in e2.value.problem
    for err in (e.value, e2.value):
        assert "UPDATE" not in str(err) and "hunter2" not in str(err)


# --------------------------------------------------------------------------- the checks themselves
@pytest.mark.parametrize("limits, option", [
    ((None, None, None), None), ((10.0, 1.0, 0), None), ((0.5, 20, 2**63 - 1), None),
    ((float("nan"), None, None), "--rate"), ((0.0, None, None), "--rate"), ((None, 0.5, None), "--burst"),
    ((None, float("inf"), None), "--burst"), ((None, None, 2**63), "--quota"), ((None, None, -1), "--quota"),
    ((None, None, 1.5), "--quota"), ((True, None, None), "--rate"),
])
def test_validate_key_limits(limits, option):
    from ipshield.errors import IPShieldError
    from ipshield.serve.limits_check import validate_key_limits

    if option is None:
        validate_key_limits(*limits)
        return
    with pytest.raises(IPShieldError) as e:
        validate_key_limits(*limits)
    assert option in e.value.problem and option in e.value.fix


def test_serve_settings_ranges_and_json_round_trip(monkeypatch):
    from pydantic import ValidationError

    from ipshield.serve.settings import ServeSettings

    s = ServeSettings(model="stub:16", db="sqlite:///x.db", body_timeout_s=5, max_request_pixels=1000, device="CPU")
    assert s.device == "cpu" and s.body_timeout_s == 5.0 and s.max_request_pixels == 1000
    assert ServeSettings.model_validate_json(s.model_dump_json()) == s
    for bad in (dict(body_timeout_s=0), dict(body_timeout_s=float("inf")), dict(max_request_pixels=0),
                dict(default_rate=float("nan")), dict(default_burst=0.5), dict(default_quota=2**63),
                dict(model="stub:0"), dict(model="stub:x"), dict(device="gpu"), dict(torch_threads=0),
                dict(db="ipshield.db")):
        with pytest.raises(ValidationError):
            ServeSettings(**bad)


def test_sqlite_file_and_check_database(tmp_path):
    from ipshield.errors import IPShieldError
    from ipshield.serve.server import check_database, sqlite_file

    assert sqlite_file("sqlite://") is None and sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("postgresql+psycopg://u:p@h/db") is None
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_file(f"sqlite:///file:{tmp_path}/a.db?mode=ro&uri=true") == tmp_path / "a.db"
    check_database("sqlite://", create=False)  # in memory: nothing to look at
    missing = f"sqlite:///{tmp_path}/missing.db"
    with pytest.raises(IPShieldError, match="does not exist"):
        check_database(missing, create=False)
    check_database(missing, create=True)
    assert not (tmp_path / "missing.db").exists()  # a check creates nothing
    with pytest.raises(IPShieldError, match="folder"):
        check_database(f"sqlite:///{tmp_path}/nodir/x.db", create=True)


# --------------------------------------------------------------------------- serve --workers 2
def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return resp.status


@needs_exe
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.timeout(20)
def test_serve_with_two_workers_answers_health(tmp_path):
    from ipshield.serve.server import LOOPBACK, free_port

    db = tmp_path / "w.db"
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(EXE), "serve", "--model", "stub:16", "--no-watermark", "--create-db",
                                 "--db", f"sqlite:///{db}", "--host", LOOPBACK, "--port", str(port), "--workers", "2"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=_env(tmp_path))
    try:
        deadline, ok = time.monotonic() + 17, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ok = _get(f"http://{LOOPBACK}:{port}/health") == 200
            except OSError:
                ok = False
            text = log_path.read_text()
            if ok and text.count("Application startup complete") >= 2:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            rc = proc.wait()
    text = log_path.read_text()
    assert ok, text
    assert text.count("Started server process") == 2, text  # two workers
    assert db.is_file()  # --create-db made it
    assert rc == 0 and "Traceback" not in text, text
