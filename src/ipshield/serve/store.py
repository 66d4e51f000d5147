"""API keys (hashed, constant-time checks), per-key token buckets, and the audit recorder.

Key format: ``ipsk_<key_id>_<secret>``: ``key_id`` (12 hex characters) is public and only used to
find the row; ``secret`` is 256 random bits (``secrets.token_urlsafe(32)``). The database keeps
SHA-256 of the whole key: with a 256-bit secret a slow password hash buys nothing (nobody can
brute-force 2^256), and SHA-256 keeps every request cheap. Presented keys are compared with
``hmac.compare_digest``; an unknown or malformed key is compared against a dummy hash so the time
taken does not say whether the ``key_id`` exists.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from ipshield.errors import IPShieldError
from ipshield.serve.db import api_keys, usage

_KEY_RE = re.compile(r"^ipsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_CUSTOMER_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")  # as ipshield.watermark.keys
_DUMMY_HASH = hashlib.sha256(b"ipshield-dummy-key").hexdigest()
SKETCH_K = 16  # dimension of the random projection kept for the extraction monitor


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


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

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _record(row) -> KeyRecord:
    m = row._mapping
    return KeyRecord(
        key_id=m["key_id"], customer=m["customer"], rate=m["rate"], burst=m["burst"], quota=m["quota"],
        used=int(m["used"] or 0), created_at=m["created_at"], revoked_at=m["revoked_at"], last_used_at=m["last_used_at"],
    )


class KeyStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, customer: str, rate: float | None = None, burst: float | None = None, quota: int | None = None) -> tuple[str, KeyRecord]:
        """A new key for ``customer``; returns the raw key (show it once, it is not stored) and its record."""
        if not valid_customer(customer):
            raise IPShieldError(f"invalid customer name {customer!r}", "use 1-128 characters from letters, digits and _ . : @ -")
        if rate is not None and rate <= 0:
            raise IPShieldError("rate must be positive", "give requests per second, e.g. --rate 10")
        if quota is not None and quota < 0:
            raise IPShieldError("quota must be >= 0", "give the number of embeddings allowed, e.g. --quota 100000")
        key_id = secrets.token_hex(6)
        raw = f"ipsk_{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, key_hash=hash_key(raw), customer=customer, rate=rate, burst=burst, quota=quota,
                used=0, created_at=now, revoked_at=None, last_used_at=None,
            ))
        return raw, KeyRecord(key_id, customer, rate, burst, quota, 0, now, None, None)

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
        m = _KEY_RE.match(key)
        key_id = m.group(1) if m else key
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
        m = _KEY_RE.match(raw or "")
        presented = hash_key(raw or "")
        if not m:
            hmac.compare_digest(presented, _DUMMY_HASH)
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == m.group(1))).first()
        stored = row._mapping["key_hash"] if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(presented, stored)
        return _record(row) if (row is not None and ok) else None


class TokenBuckets:
    """One token bucket per key id (in memory): ``rate`` tokens per second, at most ``burst``."""

    def __init__(self):
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float, burst: float, cost: float = 1.0, now: float | None = None) -> float:
        """Take ``cost`` tokens; returns 0.0 when allowed, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._state.get(key_id, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= cost:
                self._state[key_id] = (tokens - cost, now)
                return 0.0
            self._state[key_id] = (tokens, now)
            return (cost - tokens) / rate


def projection(dim: int) -> np.ndarray:
    """The fixed random projection ``[dim, SKETCH_K]`` (orthonormal columns) used by the sketch."""
    g = np.random.default_rng(12345 + dim).standard_normal((dim, SKETCH_K))
    q, _ = np.linalg.qr(g)
    return q


class _Window:
    __slots__ = ("requests", "images", "texts", "rejected", "hashes", "n", "sum_full", "sum_proj", "outer")

    def __init__(self):
        self.requests = self.images = self.texts = self.rejected = 0
        self.hashes: set[bytes] = set()
        self.n = 0
        self.sum_full: np.ndarray | None = None
        self.sum_proj = np.zeros(SKETCH_K)
        self.outer = np.zeros((SKETCH_K, SKETCH_K))


def pack_sketch(n: int, sum_full: np.ndarray, sum_proj: np.ndarray, outer: np.ndarray) -> bytes:
    head = np.array([n, sum_full.size], dtype=np.float64)
    return np.concatenate([head, sum_full.ravel(), sum_proj.ravel(), outer.ravel()]).astype(np.float64).tobytes()


def unpack_sketch(blob: bytes | None):
    if not blob:
        return None
    a = np.frombuffer(blob, dtype=np.float64)
    n, d = int(a[0]), int(a[1])
    sum_full = a[2 : 2 + d]
    sum_proj = a[2 + d : 2 + d + SKETCH_K]
    outer = a[2 + d + SKETCH_K :].reshape(SKETCH_K, SKETCH_K)
    return n, sum_full.copy(), sum_proj.copy(), outer.copy()


class UsageRecorder:
    """Counts per key and time window, kept in memory and written to ``usage`` by ``flush()``
    (periodically by the server, and at shutdown). Distinct-input counts use the set of input hashes
    of the current window (memory bounded by the traffic of one window)."""

    def __init__(self, engine: Engine, window_s: int = 60):
        self.engine = engine
        self.window_s = int(window_s)
        self._pending: dict[tuple[str, int], _Window] = {}
        self._unique_seen: dict[tuple[str, int], set[bytes]] = {}
        self._used: dict[str, int] = {}  # embeddings served since the last flush
        self._total: dict[str, int] = {}  # embeddings served in all (this process's view)
        self._last_used: dict[str, float] = {}
        self._proj: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def _window(self, key_id: str, now: float) -> tuple[tuple[str, int], _Window]:
        start = int(now // self.window_s) * self.window_s
        k = (key_id, start)
        w = self._pending.get(k)
        if w is None:
            w = self._pending[k] = _Window()
        return k, w

    def pending_used(self, key_id: str) -> int:
        with self._lock:
            return self._used.get(key_id, 0)

    def try_reserve(self, key_id: str, n: int, used_in_db: int, quota: int | None) -> bool:
        """Count ``n`` embeddings against the key unless that would pass ``quota``. This process
        keeps the running total (seeded from the database the first time it sees the key), so
        concurrent requests cannot overshoot the quota; several server processes on one database
        each keep their own total (the quota is then exact only to within one flush)."""
        with self._lock:
            total = self._total.get(key_id)
            if total is None:
                total = int(used_in_db) + self._used.get(key_id, 0)
            if quota is not None and total + n > quota:
                self._total[key_id] = total
                return False
            self._total[key_id] = total + n
            self._used[key_id] = self._used.get(key_id, 0) + n
            return True

    def record(self, key_id: str, n_images: int, n_texts: int, input_hashes: list[bytes], clean: np.ndarray | None) -> None:
        now = time.time()
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
            k, w = self._window(key_id, now)
            w.requests += 1
            w.images += n_images
            w.texts += n_texts
            seen = self._unique_seen.setdefault(k, set())
            for h in input_hashes:
                if h not in seen:
                    seen.add(h)
                    w.hashes.add(h)
            if sk is not None:
                w.n += sk[0]
                w.sum_full = sk[1] if w.sum_full is None else w.sum_full + sk[1]
                w.sum_proj += sk[2]
                w.outer += sk[3]
            self._last_used[key_id] = now

    def reject(self, key_id: str) -> None:
        with self._lock:
            _, w = self._window(key_id, time.time())
            w.rejected += 1

    def flush(self) -> None:
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                used, self._used = self._used, {}
                last, self._last_used = self._last_used, {}
                # forget the distinct-input sets of windows that are over
                cutoff = int(time.time() // self.window_s) * self.window_s
                for k in [k for k in self._unique_seen if k[1] < cutoff]:
                    del self._unique_seen[k]
            if not pending and not used:
                return
            try:
                self._write(pending, used, last)
            except Exception:
                # put the counts back so nothing is lost; the next flush retries
                with self._lock:
                    for k, n in used.items():
                        self._used[k] = self._used.get(k, 0) + n
                    for k, w in pending.items():
                        cur = self._pending.get(k)
                        if cur is None:
                            self._pending[k] = w
                        else:
                            _merge(cur, w)
                raise

    def _write(self, pending, used, last) -> None:
        with self.engine.begin() as conn:
            for key_id, n in used.items():
                conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(
                    used=api_keys.c.used + n, last_used_at=last.get(key_id)))
            for (key_id, start), w in pending.items():
                row = conn.execute(select(usage).where(usage.c.key_id == key_id, usage.c.window_start == start)).first()
                blob = None
                if w.sum_full is not None:
                    n, sf, sp, so = w.n, w.sum_full, w.sum_proj, w.outer
                    if row is not None and row._mapping["sketch"]:
                        old = unpack_sketch(row._mapping["sketch"])
                        if old is not None and old[1].size == sf.size:
                            n, sf, sp, so = n + old[0], sf + old[1], sp + old[2], so + old[3]
                    blob = pack_sketch(n, sf, sp, so)
                if row is None:
                    conn.execute(usage.insert().values(
                        key_id=key_id, window_start=start, window_s=self.window_s, requests=w.requests, images=w.images,
                        texts=w.texts, rejected=w.rejected, unique_inputs=len(w.hashes), sketch=blob))
                else:
                    m = row._mapping
                    vals = dict(requests=m["requests"] + w.requests, images=m["images"] + w.images, texts=m["texts"] + w.texts,
                                rejected=m["rejected"] + w.rejected, unique_inputs=m["unique_inputs"] + len(w.hashes))
                    if blob is not None:
                        vals["sketch"] = blob
                    conn.execute(update(usage).where(usage.c.id == m["id"]).values(**vals))


def _merge(a: _Window, b: _Window) -> None:
    a.requests += b.requests
    a.images += b.images
    a.texts += b.texts
    a.rejected += b.rejected
    a.hashes |= b.hashes
    if b.sum_full is not None:
        a.n += b.n
        a.sum_full = b.sum_full if a.sum_full is None else a.sum_full + b.sum_full
        a.sum_proj += b.sum_proj
        a.outer += b.outer
