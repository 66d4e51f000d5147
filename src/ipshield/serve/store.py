"""API keys (hashed, constant-time checks), the shared limits, the ledger and the audit recorder.

Key format: ``ipsk_<key_id>_<secret>``: ``key_id`` (12 hex characters) is public and only used to
find the row; ``secret`` is 256 random bits (``secrets.token_urlsafe(32)``). The database keeps
SHA-256 of the whole key: with a 256-bit secret a slow password hash buys nothing (nobody can
brute-force 2^256), and SHA-256 keeps every request cheap. Presented keys are compared with
``hmac.compare_digest``; an unknown or malformed key is compared against a dummy hash so the time
taken does not say whether the ``key_id`` exists.

What must hold across any number of server processes on one database is decided by the database
in one atomic statement [ours]:
- the rate limit: GCRA (a token bucket written as one "theoretical arrival time" per key,
  ``api_keys.tat``), taken by a conditional ``UPDATE ... WHERE`` (``KeyStore.take_rate``);
- the quota and the audit counts: ``Ledger.charge`` adds a request's items to ``api_keys.used``
  only if the quota allows (``UPDATE ... WHERE used + n <= quota``) and, in the same transaction,
  to the request's audit row. It runs after the embeddings are computed and before the response is
  sent: a served embedding is counted and audited, or the request fails and nothing is charged.
What is only evidence (rejections, failed authentications, distinct inputs, the extraction
monitor's statistics) is kept in memory and written by ``UsageRecorder.flush`` every second.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import bindparam, case, func, or_, select, update
from sqlalchemy.engine import Engine

from ipshield.errors import IPShieldError
from ipshield.serve.db import api_keys, usage, usage_sketch

_KEY_RE = re.compile(r"^ipsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_CUSTOMER_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")  # as ipshield.watermark.keys
_DUMMY_HASH = hashlib.sha256(b"ipshield-dummy-key").hexdigest()
SKETCH_K = 16  # dimension of the random projection behind the effective rank
SKETCH_MIN = 32  # a window's statistics are stored only over at least this many embeddings


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def key_id_of(raw: str | None) -> str | None:
    """The public id inside a well-formed key, else None."""
    m = _KEY_RE.match(raw or "")
    return m.group(1) if m else None


def valid_customer(name: str) -> bool:
    return bool(_CUSTOMER_RE.match(name or ""))


@dataclass
class KeyRecord:
    key_id: str
    customer: str
    rate: float | None
    burst: float | None
    quota: int | None
    used: int
    created_at: float
    revoked_at: float | None
    last_used_at: float | None
    admin: bool = False

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _record(row) -> KeyRecord:
    m = row._mapping
    return KeyRecord(
        key_id=m["key_id"], customer=m["customer"], rate=m["rate"], burst=m["burst"], quota=m["quota"],
        used=int(m["used"] or 0), created_at=m["created_at"], revoked_at=m["revoked_at"], last_used_at=m["last_used_at"],
        admin=bool(m.get("admin") or 0),
    )


def _greatest(col, v):
    """``max(col, v)``, NULL read as ``v``, in SQL that SQLite and PostgreSQL both read."""
    return case((col.is_(None), v), (col > v, col), else_=v)


# the hot path's statements, built once (building a statement costs more than running it)
_NOW = bindparam("now", type_=api_keys.c.tat.type)
_GCRA_BASE = _greatest(api_keys.c.tat, _NOW)
_TAKE_RATE = (update(api_keys)
              .where(api_keys.c.key_id == bindparam("kid"), _GCRA_BASE - _NOW <= bindparam("tolerance", type_=api_keys.c.tat.type))
              .values(tat=_GCRA_BASE + bindparam("interval", type_=api_keys.c.tat.type)))
_TAT = select(api_keys.c.tat).where(api_keys.c.key_id == bindparam("kid"))
_BY_ID = select(api_keys).where(api_keys.c.key_id == bindparam("kid"))
_N = bindparam("n", type_=api_keys.c.used.type)
_CHARGE = (update(api_keys).where(api_keys.c.key_id == bindparam("kid"), or_(api_keys.c.quota.is_(None), api_keys.c.used + _N <= api_keys.c.quota))
           .values(used=api_keys.c.used + _N, last_used_at=bindparam("now")))
_CHARGE_DEFAULT = (update(api_keys)
                   .where(api_keys.c.key_id == bindparam("kid"),
                          api_keys.c.used + _N <= func.coalesce(api_keys.c.quota, bindparam("default_quota", type_=api_keys.c.used.type)))
                   .values(used=api_keys.c.used + _N, last_used_at=bindparam("now")))


class KeyStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, customer: str, rate: float | None = None, burst: float | None = None, quota: int | None = None,
               admin: bool = False) -> tuple[str, KeyRecord]:
        """A new key for ``customer``; returns the raw key (show it once, it is not stored) and its
        record. ``admin``: an owner key (opens the owner's page; it embeds like any other key)."""
        from ipshield.serve.limits_check import validate_key_limits

        if not valid_customer(customer):
            raise IPShieldError(f"invalid customer name {customer!r}", "use 1-128 characters from letters, digits and _ . : @ -")
        validate_key_limits(rate, burst, quota)
        key_id = secrets.token_hex(6)
        raw = f"ipsk_{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, key_hash=hash_key(raw), customer=customer, rate=rate, burst=burst, quota=quota,
                used=0, created_at=now, revoked_at=None, last_used_at=None, admin=1 if admin else 0,
            ))
        return raw, KeyRecord(key_id, customer, rate, burst, quota, 0, now, None, None, bool(admin))

    def list(self, include_revoked: bool = True) -> list[KeyRecord]:
        q = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(q)]

    def get(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _record(row) if row is not None else None

    def revoke(self, key: str) -> KeyRecord:
        """Revoke by key id (as listed) or by the raw key itself."""
        key_id = key_id_of(key) or key
        rec = self.get(key_id)
        if rec is None:
            raise IPShieldError(f"no key with id {key_id!r}", "see `ipshield keys list --db URL` for the ids")
        if not rec.revoked:
            with self.engine.begin() as conn:
                conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_at=time.time()))
            rec = self.get(key_id)
        return rec

    def lookup(self, raw: str | None) -> KeyRecord | None:
        """The record of a valid key (revoked ones included: the caller decides), else None."""
        key_id = key_id_of(raw)
        presented = hash_key(raw or "")
        if key_id is None:
            hmac.compare_digest(presented, _DUMMY_HASH)
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_BY_ID, {"kid": key_id}).first()
        stored = row._mapping["key_hash"] if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(presented, stored)
        return _record(row) if (row is not None and ok) else None

    def take_rate(self, key_id: str, rate: float, burst: float, now: float | None = None) -> float:
        """One request against the key's rate limit, decided by the database (GCRA): 0.0 when
        allowed, else the seconds to wait. ``rate`` requests/s, at most ``burst`` at once. One
        conditional UPDATE, so it is exact with any number of processes on the database."""
        now = time.time() if now is None else now
        interval = 1.0 / float(rate)
        tolerance = max(0.0, float(burst) - 1.0) * interval
        with self.engine.begin() as conn:
            res = conn.execute(_TAKE_RATE, {"kid": key_id, "now": now, "tolerance": tolerance + 1e-9, "interval": interval})
            if res.rowcount == 1:
                return 0.0
            tat = conn.execute(_TAT, {"kid": key_id}).scalar()
        return max(1e-3, float(tat if tat is not None else now) - now - tolerance)


class KeyCache:
    """Valid key records by key hash, for ``ttl_s`` seconds (a revocation reaches every process
    within ``ttl_s``). Unknown keys are never cached. Bounded (LRU)."""

    def __init__(self, store: KeyStore, ttl_s: float = 1.0, size: int = 4096):
        self.store, self.ttl, self.size = store, float(ttl_s), int(size)
        self._d: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def peek(self, raw: str) -> KeyRecord | None:
        if self.ttl <= 0:
            return None
        h = hash_key(raw)
        with self._lock:
            hit = self._d.get(h)
            if hit is not None and hit[0] > time.monotonic():
                self._d.move_to_end(h)
                return hit[1]
        return None

    def lookup(self, raw: str) -> KeyRecord | None:
        rec = self.peek(raw)
        if rec is not None:
            return rec
        rec = self.store.lookup(raw)
        if rec is not None and self.ttl > 0:
            with self._lock:
                self._d[hash_key(raw)] = (time.monotonic() + self.ttl, rec)
                while len(self._d) > self.size:
                    self._d.popitem(last=False)
        return rec


class FailureLimiter:
    """Failed authentications per client address (in memory, per process): past ``limit`` in
    ``window_s`` seconds the address gets 429 before any key is looked at. It throttles a guesser
    without locking the key's real owner out (who calls from elsewhere)."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, size: int = 65536):
        self.limit, self.window, self.size = int(limit), float(window_s), int(size)
        self._d: OrderedDict[str, list[float]] = OrderedDict()  # addr -> [window start, count]
        self._lock = threading.Lock()

    def retry_after(self, addr: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._d.get(addr)
            if w is None or now - w[0] >= self.window or w[1] < self.limit:
                return 0.0
            return self.window - (now - w[0])

    def fail(self, addr: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._d.get(addr)
            if w is None or now - w[0] >= self.window:
                self._d[addr] = [now, 1]
            else:
                w[1] += 1
            self._d.move_to_end(addr)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


def _upsert(dialect: str, table, index: list[str], values: dict, add=(), replace=()):
    """INSERT ... ON CONFLICT (index) DO UPDATE: ``add`` columns are incremented, ``replace`` ones
    overwritten (SQLite and PostgreSQL)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    ins = insert(table).values(**values)
    sets = {c: table.c[c] + ins.excluded[c] for c in add}
    sets.update({c: ins.excluded[c] for c in replace})
    return ins.on_conflict_do_update(index_elements=[table.c[c] for c in index], set_=sets)


class Ledger:
    """What a request costs, charged exactly once and atomically, after the work and before the
    response (see the module's docstring)."""

    def __init__(self, engine: Engine, window_s: int = 60):
        self.engine = engine
        self.window_s = int(window_s)
        self.dialect = engine.dialect.name
        self._audit = _upsert(self.dialect, usage, ["key_id", "window_start"],
                              dict(key_id=bindparam("kid"), window_start=bindparam("start"), window_s=self.window_s, requests=1,
                                   images=bindparam("n_images"), texts=bindparam("n_texts"), rejected=0, unique_inputs=0,
                                   auth_failures=0),
                              add=["requests", "images", "texts"])

    def charge(self, key_id: str, n_images: int, n_texts: int, default_quota: int | None = None,
               now: float | None = None) -> bool:
        """Add the items to the key's ``used`` and to its audit row if the quota allows; False
        (nothing written) when it does not."""
        now = time.time() if now is None else now
        params = {"kid": key_id, "n": int(n_images) + int(n_texts), "now": now}
        if default_quota is None:
            stmt = _CHARGE
        else:
            stmt, params["default_quota"] = _CHARGE_DEFAULT, int(default_quota)
        with self.engine.begin() as conn:
            if conn.execute(stmt, params).rowcount != 1:
                return False
            conn.execute(self._audit, {"kid": key_id, "start": int(now // self.window_s) * self.window_s,
                                       "n_images": int(n_images), "n_texts": int(n_texts)})
        return True

    def used(self, key_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(api_keys.c.used).where(api_keys.c.key_id == key_id)).scalar() or 0)


def projection(dim: int) -> np.ndarray:
    """The fixed random projection ``[dim, SKETCH_K]`` (orthonormal columns) behind the effective rank."""
    g = np.random.default_rng(12345 + dim).standard_normal((dim, SKETCH_K))
    q, _ = np.linalg.qr(g)
    return q


def effective_rank(cov: np.ndarray) -> float:
    ev = np.clip(np.linalg.eigvalsh((cov + cov.T) / 2), 0, None)
    if ev.sum() <= 0:
        return 0.0
    p = ev / ev.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class _Window:
    __slots__ = ("rejected", "auth_failures", "hashes", "n", "sum_full", "sum_proj", "outer")

    def __init__(self):
        self.rejected = self.auth_failures = 0
        self.hashes: set[bytes] = set()
        self.n = 0
        self.sum_full: np.ndarray | None = None
        self.sum_proj = np.zeros(SKETCH_K)
        self.outer = np.zeros((SKETCH_K, SKETCH_K))

    def stats(self) -> tuple[int, float, float] | None:
        """(n, spread, effective rank / SKETCH_K) over at least SKETCH_MIN embeddings, else None."""
        if self.n < SKETCH_MIN or self.sum_full is None:
            return None
        mean = self.sum_full / self.n
        spread = float(max(0.0, 1.0 - mean @ mean))
        mp = self.sum_proj / self.n
        eff = effective_rank(self.outer / self.n - np.outer(mp, mp)) / SKETCH_K
        return self.n, spread, eff


class UsageRecorder:
    """The evidence that is not money, kept in memory per key and audit window and written by
    ``flush()`` (every second by the server, and at shutdown): rejections, failed
    authentications, distinct inputs (exact within a window and process), and the extraction
    monitor's statistics of the clean embeddings. The moments behind those statistics stay in
    memory; the database gets two scalars per window over at least ``SKETCH_MIN`` embeddings
    (``usage_sketch``, one row per process, replaced as the window fills): nothing stored can give
    back an embedding."""

    def __init__(self, engine: Engine, window_s: int = 60):
        self.engine = engine
        self.window_s = int(window_s)
        self.dialect = engine.dialect.name
        self.writer = secrets.token_hex(8)
        self._pending: dict[tuple[str, int], _Window] = {}  # counts not yet written
        self._sketch: dict[tuple[str, int], _Window] = {}  # whole-window moments (memory only)
        self._unique_seen: dict[tuple[str, int], set[bytes]] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._proj: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def _key(self, key_id: str, now: float) -> tuple[str, int]:
        return key_id, int(now // self.window_s) * self.window_s

    def _pend(self, k) -> _Window:
        w = self._pending.get(k)
        if w is None:
            w = self._pending[k] = _Window()
        return w

    def record(self, key_id: str, input_hashes: list[bytes], clean: np.ndarray | None, now: float | None = None) -> None:
        """A served request's inputs (hashes) and clean embeddings (reduced to moments here)."""
        now = time.time() if now is None else now
        sk = None
        if clean is not None and len(clean):
            d = clean.shape[1]
            p = self._proj.get(d)
            if p is None:
                p = self._proj[d] = projection(d)
            c = clean.astype(np.float64)
            z = c @ p
            sk = (len(c), c.sum(0), z.sum(0), z.T @ z)
        with self._lock:
            k = self._key(key_id, now)
            w = self._pend(k)
            seen = self._unique_seen.setdefault(k, set())
            for h in input_hashes:
                if h not in seen:
                    seen.add(h)
                    w.hashes.add(h)
            if sk is not None:
                s = self._sketch.get(k)
                if s is None:
                    s = self._sketch[k] = _Window()
                s.n += sk[0]
                s.sum_full = sk[1] if s.sum_full is None else s.sum_full + sk[1]
                s.sum_proj += sk[2]
                s.outer += sk[3]
                self._dirty.add(k)

    def reject(self, key_id: str, n: int = 1) -> None:
        with self._lock:
            self._pend(self._key(key_id, time.time())).rejected += n

    def auth_failure(self, key_id: str) -> None:
        with self._lock:
            w = self._pend(self._key(key_id, time.time()))
            w.auth_failures += 1
            w.rejected += 1

    def flush(self) -> None:
        with self._flush_lock:
            cutoff = int(time.time() // self.window_s) * self.window_s
            with self._lock:
                pending, self._pending = self._pending, {}
                stats = {}
                for k in self._dirty:
                    st = self._sketch[k].stats()
                    if st is not None:
                        stats[k] = st
                self._dirty -= set(stats)
                # windows that are over: their moments and distinct-input sets are forgotten
                for d in (self._sketch, self._unique_seen):
                    for k in [k for k in d if k[1] < cutoff]:
                        del d[k]
                self._dirty = {k for k in self._dirty if k[1] >= cutoff}
            if not pending and not stats:
                return
            try:
                self._write(pending, stats)
            except Exception:
                with self._lock:  # put the counts back; the next flush retries
                    for k, w in pending.items():
                        cur = self._pend(k)
                        cur.rejected += w.rejected
                        cur.auth_failures += w.auth_failures
                        cur.hashes |= w.hashes
                    self._dirty |= {k for k in stats if k in self._sketch}
                raise

    def _write(self, pending, stats) -> None:
        with self.engine.begin() as conn:
            for (key_id, start), w in pending.items():
                if not (w.rejected or w.auth_failures or w.hashes):
                    continue
                conn.execute(_upsert(self.dialect, usage, ["key_id", "window_start"],
                                     dict(key_id=key_id, window_start=start, window_s=self.window_s, requests=0, images=0,
                                          texts=0, rejected=w.rejected, unique_inputs=len(w.hashes), auth_failures=w.auth_failures),
                                     add=["rejected", "unique_inputs", "auth_failures"]))
            for (key_id, start), (n, spread, eff) in stats.items():
                conn.execute(_upsert(self.dialect, usage_sketch, ["key_id", "window_start", "writer"],
                                     dict(key_id=key_id, window_start=start, writer=self.writer, n=n, spread=spread, eff_rank=eff),
                                     replace=["n", "spread", "eff_rank"]))
