"""The suspect monitor: re-verify suspect embedding APIs for the owner's watermark, on a schedule.

A suspects file (YAML) lists the APIs to watch, one entry each::

    - name: cheap-embeddings          # how the suspect is called in the history (unique)
      url: https://api.example.com    # its base URL (http or https; no credentials in it)
      api_key_env: CHEAP_API_KEY      # the NAME of the environment variable holding its API key
      max_queries: 512                # query budget of one check (optional; default: --max-queries)
      api: openai                     # its API schema: ipshield (default) or openai (optional)
      customer: acme                  # verify this customer's watermark only (optional; default:
                                      # identify the leaking customer among the watermark's ones)

``check_suspect`` runs one verification of one suspect through the verification code of ``ipshield
verify`` (``ipshield.watermark.verify`` over ``serve.client.HTTPSuspect``, whose budget caps the
queries sent) and stores the outcome in the ``suspect_checks`` table: the verdict ("stolen",
"not-detected", "inconclusive", or "error" when the suspect could not be checked), the p-values of
the trigger and distribution tests, the scheme, the queries spent and the identified customer, with
a short note (``detail``: the combined p-value and threshold, or what went wrong; never a
traceback, a key or a URL). ``run_monitor`` checks every suspect once per round, ``history`` reads
the table back (newest first).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ipshield.errors import IPShieldError
from ipshield.serve.db import suspect_checks

log = logging.getLogger("ipshield.monitor")

ERROR = "error"  # the verdict of a check that could not run (the suspect did not answer, ...)
DETAIL_CHARS = 500
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_FILE_HINT = "each entry: name, url, api_key_env (an environment variable's name), and optionally max_queries, api, customer"


# ----------------------------------------------------------------------------- the suspects file
def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host and no credentials; else an ``IPShieldError``
    (which never repeats the URL: it could hold a password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise IPShieldError("the suspect URL is not an http(s) URL with a host",
                            "give the API's base URL, e.g. https://api.example.com")
    if parts.username is not None or parts.password is not None:
        raise IPShieldError("the suspect URL holds credentials (user:password@)",
                            "remove them from the URL; put the API key in the environment variable named by api_key_env")
    return url


class SuspectSpec(BaseModel):
    """One entry of the suspects file (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the suspect's name in the history (unique in the file)")
    url: str = Field(description="the suspect API's base URL, http or https")
    api_key_env: str | None = Field(None, description="the name of the environment variable holding its API key")
    max_queries: int | None = Field(None, ge=1, le=10_000_000, description="query budget of one check")
    api: Literal["ipshield", "openai"] = Field("ipshield", description="the API's schema")
    customer: str | None = Field(None, description="verify this customer only (default: identify among all)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-200 printable characters")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            return check_url(v.strip())
        except IPShieldError as exc:
            raise ValueError(exc.problem) from None

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from ipshield.serve.store import key_id_of

        if key_id_of(v) is not None or len(v) > 64:
            raise ValueError("looks like an API key (or is over 64 characters): give the NAME of an environment "
                             "variable that holds the key")
        if not _ENV_RE.match(v):
            raise ValueError("must be an environment variable's name (letters, digits and _, not starting with a digit)")
        return v


def _describe(err: dict) -> str:
    """A pydantic error without the offending value (it could be a pasted secret)."""
    loc = [str(x) for x in err.get("loc", ())]
    if err.get("type") == "extra_forbidden":
        return "has an unknown key (" + (loc[-1] if loc and _ENV_RE.match(loc[-1]) and len(loc[-1]) <= 32 else "?") + ")"
    where = ".".join(loc) or "the entry"
    msg = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{where}: {msg}"


def parse_suspects(data: Any, source: str = "the suspects file") -> list[SuspectSpec]:
    """Suspect entries from parsed YAML/JSON (a list of mappings); ``IPShieldError`` naming the
    entry and the field of anything wrong."""
    if data is None:
        data = []
    if not isinstance(data, list):
        raise IPShieldError(f"{source} is not a list of suspects", _FILE_HINT)
    specs, seen = [], set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise IPShieldError(f"{source}: entry {i + 1} is not a mapping", _FILE_HINT)
        try:
            spec = SuspectSpec(**{str(k): v for k, v in entry.items()})
        except ValidationError as exc:
            raise IPShieldError(f"{source}: entry {i + 1} " + "; ".join(_describe(e) for e in exc.errors()[:5]),
                                _FILE_HINT) from None
        if spec.name in seen:
            raise IPShieldError(f"{source}: the name {spec.name!r} is used twice", "give every suspect its own name")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def load_suspects(path: str | Path) -> list[SuspectSpec]:
    """The entries of a YAML suspects file; ``IPShieldError`` for a missing file, bad YAML or a bad
    entry."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise IPShieldError(f"the suspects file {p} does not exist",
                            "give --suspects FILE, a YAML list of suspects (see docs/service.md)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IPShieldError(f"cannot read the suspects file {p} ({type(exc).__name__})", "check the file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise IPShieldError(f"the suspects file {p} is not valid YAML{where}", _FILE_HINT) from None
    specs = parse_suspects(data, f"the suspects file {p}")
    if not specs:
        raise IPShieldError(f"the suspects file {p} lists no suspects", _FILE_HINT)
    return specs


def suspect_key(spec: SuspectSpec, environ: dict | None = None) -> str | None:
    """The API key of a suspect, from the environment variable its entry names (None: no key)."""
    if spec.api_key_env is None:
        return None
    env = os.environ if environ is None else environ
    value = env.get(spec.api_key_env)
    if value is None or not value.strip():
        raise IPShieldError(f"the environment variable {spec.api_key_env} (api_key_env of suspect {spec.name!r}) is not set",
                            f"export {spec.api_key_env}=THE_SUSPECT_API_KEY before starting the monitor")
    return value.strip()


# ----------------------------------------------------------------------------- one verification
@dataclass
class Verifier:
    """What ``ipshield verify`` loads once (the watermark, the clean model, the probes), kept
    across checks and rounds. ``run`` verifies one embedder with ``ipshield.watermark.verify``."""

    watermark: Any
    clean: Any
    probes: Any
    customers: list[str] = field(default_factory=list)
    alpha: float = 1e-6
    max_queries: int = 512
    calibration: dict | None = None

    @property
    def scheme(self) -> str:
        return str(getattr(self.watermark, "scheme", "unknown"))

    @classmethod
    def load(cls, key_file: str | Path, watermark_dir: str | Path, clean_model: str | Path | None = None,
             customers: Sequence[str] | None = None, alpha: float = 1e-6, max_queries: int = 512,
             n_probes: int = 512, probe_seed: int = 9) -> "Verifier":
        from ipshield.models.clip import load_clip
        from ipshield.watermark.base import load_watermark, read_watermark_json, reference_from_synthetic

        if not Path(key_file).expanduser().is_file():
            raise IPShieldError(f"the master key file {key_file} does not exist",
                                "give --key-file, the key of `ipshield watermark keygen`")
        info = read_watermark_json(watermark_dir)
        wm = load_watermark(watermark_dir, key_file)
        clean_path = clean_model or info.get("model")
        if not clean_path:
            raise IPShieldError("the watermark folder does not name the clean model", "pass --clean-model DIR")
        ids = list(dict.fromkeys(customers or info.get("customers") or []))
        return cls(wm, load_clip(clean_path), reference_from_synthetic(n_probes, seed=probe_seed), ids, float(alpha),
                   int(max_queries), info.get("calibration"))

    def run(self, embedder, customer: str | None = None, max_queries: int | None = None):
        """A ``VerificationReport``: ``customer``'s watermark, or the best of ``customers``."""
        from ipshield.watermark.verify import Suspect, identify_customer, verify

        budget = int(max_queries or self.max_queries)
        suspect = Suspect.from_embedder(embedder)
        if customer is not None:
            return verify(self.watermark, suspect, self.clean, self.probes, customer, max_queries=budget,
                          alpha=self.alpha, calibration=self.calibration)
        if not self.customers:
            raise IPShieldError("no customers to identify among",
                                "pass --customers a,b,c, give the suspect a customer, or apply the watermark with --customers")
        return identify_customer(self.watermark, suspect, self.clean, self.probes, self.customers, max_queries=budget,
                                 alpha=self.alpha, calibration=self.calibration)


def _p(tests: dict, name: str) -> float | None:
    t = tests.get(name)
    p = getattr(t, "p_value", None)
    return float(p) if p is not None and math.isfinite(p) else None


def _short(text: str, secret: str | None) -> str:
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "[redacted]")
    return text[:DETAIL_CHARS]


def check_suspect(engine: Engine, suspect: SuspectSpec, verifier: Verifier, *, max_queries: int | None = None,
                  key: str | None = None, environ: dict | None = None, timeout_s: float = 60.0,
                  now: float | None = None, transport=None) -> dict:
    """Verify one suspect API once (at most its query budget), store the outcome in
    ``suspect_checks`` and return the stored row (a dict). Never raises for the suspect's
    failures: they are stored with the verdict "error" and a one-line reason."""
    from ipshield.serve.client import HTTPSuspect

    budget = int(suspect.max_queries or max_queries or verifier.max_queries)
    checked_at = time.time() if now is None else float(now)
    row: dict = {"suspect": suspect.name, "checked_at": checked_at, "scheme": verifier.scheme, "verdict": ERROR,
                 "p_trigger": None, "p_distribution": None, "queries": 0, "customer": None, "detail": None}
    http = None
    try:
        if key is None:
            key = suspect_key(suspect, environ)
        http = HTTPSuspect(suspect.url, key, schema=suspect.api, budget=budget, timeout=timeout_s)
        rep = verifier.run(http, customer=suspect.customer, max_queries=budget)
        row.update(verdict=str(rep.verdict), p_trigger=_p(rep.tests, "trigger"), p_distribution=_p(rep.tests, "distribution"),
                   customer=rep.customer_id if rep.verdict == "stolen" else None)
        p = rep.p_value if rep.p_value == rep.p_value else float("nan")
        note = f"p={p:.3g} threshold={rep.threshold:.3g} budget={budget}"
        row["detail"] = _short("; ".join([note, *rep.reasons]), key)
    except IPShieldError as exc:  # the suspect's refusal, an unreachable API, a budget too small, ...
        row["detail"] = _short(exc.problem, key)
    except Exception as exc:  # anything else: its type only (a message could hold anything)
        row["detail"] = f"unexpected failure ({type(exc).__name__})"
    finally:
        if http is not None:
            row["queries"] = int(http.queries)
            http.close()
    with engine.begin() as conn:
        res = conn.execute(suspect_checks.insert().values(**row))
        row["id"] = int(res.inserted_primary_key[0])
    return {"id": row.pop("id"), **row}


def format_check(row: dict) -> str:
    """One log line for a stored check."""
    def num(v):
        return "-" if v is None else f"{v:.3g}"

    line = (f"{row['suspect']}: {row['verdict']} p_trigger={num(row.get('p_trigger'))} "
            f"p_distribution={num(row.get('p_distribution'))} queries={row.get('queries', 0)} "
            f"customer={row.get('customer') or '-'}")
    if row.get("verdict") == ERROR and row.get("detail"):
        line += f" ({row['detail']})"
    return line


def run_monitor(engine: Engine, specs: Sequence[SuspectSpec], every_s: float, rounds: int | None = None, *,
                verifier: Verifier, max_queries: int | None = None, environ: dict | None = None,
                log_line: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                timeout_s: float = 60.0) -> list[dict]:
    """Check every suspect, then wait until ``every_s`` seconds after the round began, and again;
    ``rounds`` rounds (None: until ``stop`` is set or the process is interrupted). One line per
    check goes to ``log_line`` (default: this module's logger). Returns the last round's rows."""
    if every_s is None or not every_s > 0 or not math.isfinite(every_s):
        raise IPShieldError("the interval between rounds must be a positive number of seconds", "give --every SECONDS, e.g. --every 3600")
    emit = log_line or log.info
    stop = stop or threading.Event()
    done, last = 0, []
    while rounds is None or done < rounds:
        began = time.monotonic()
        last = []
        for spec in specs:
            if stop.is_set():
                return last
            row = check_suspect(engine, spec, verifier, max_queries=max_queries, environ=environ, timeout_s=timeout_s)
            emit(format_check(row))
            last.append(row)
        done += 1
        if rounds is not None and done >= rounds:
            break
        if stop.wait(max(0.0, every_s - (time.monotonic() - began))):
            break
    return last


# ----------------------------------------------------------------------------- the history
def _row(m) -> dict:
    return {"id": int(m["id"]), "suspect": m["suspect"], "checked_at": float(m["checked_at"]), "scheme": m["scheme"],
            "verdict": m["verdict"], "p_trigger": m["p_trigger"], "p_distribution": m["p_distribution"],
            "queries": int(m["queries"] or 0), "customer": m["customer"], "detail": m["detail"]}


def history(engine: Engine, suspect: str | None = None, limit: int | None = 100) -> list[dict]:
    """Stored checks, newest first (``suspect``: that one only; ``limit``: at most that many)."""
    q = select(suspect_checks).order_by(suspect_checks.c.checked_at.desc(), suspect_checks.c.id.desc())
    if suspect is not None:
        q = q.where(suspect_checks.c.suspect == suspect)
    if limit is not None:
        q = q.limit(max(0, int(limit)))
    with engine.connect() as conn:
        return [_row(r._mapping) for r in conn.execute(q)]
