"""The extraction monitor: which keys look like someone stealing the model? [ours]

Model extraction needs many embeddings of many *different*, *diverse* inputs (a thief trains a
copy on a broad public set), while an ordinary application sends moderate volumes, repeats
itself (the same catalogue, the same queries) and stays in its own domain. Over the report window
(default: the last 24 h of the audit table) each key gets:

- ``items``: embeddings served; ``peak``: most items in one audit window; ``rejected``: 401/429s.
- ``unique``: distinct inputs / items (exact within an audit window, summed over windows).
- ``spread``: 1 - ||mean of the served clean embeddings||^2, the total variance of unit vectors
  (0 = every input maps to one point, near 1 = embeddings spread over the whole sphere; a single
  application domain sits well below a broad public set, because CLIP embeds one domain in a cone).
- ``eff_rank``: the effective rank (exp of the entropy of the eigenvalues) of the covariance of a
  fixed random 16-dimensional projection of the embeddings, divided by 16 (how many directions the
  inputs span).
- ``auth_failures``: wrong secrets presented with the key's id.
Both statistics are computed by the server per audit window over at least ``SKETCH_MIN``
embeddings (only the two scalars are stored, ``usage_sketch``); the report averages them over the
windows, weighted by the embeddings in each (windows with fewer embeddings do not count).

Flags (thresholds in ``MonitorConfig``, all configurable):
- ``volume``: items >= ``volume_items`` in the window, or peak >= ``peak_items`` in one audit window.
- ``diversity``: at least ``min_items`` items, unique >= ``unique_frac``, spread >= ``min_spread``
  and eff_rank >= ``min_eff_rank``.
- ``throttled``: rejected >= ``rejected_frac`` of the requests (hammering the limits).
Verdict: ``suspect`` when volume and diversity are both flagged, ``watch`` when any one flag is
raised, else ``ok``. A verdict is a lead for a human (and for ``ipshield verify``), not a proof.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine

from ipshield.serve.db import api_keys, usage, usage_sketch
from ipshield.serve.store import effective_rank  # noqa: F401  (re-exported)


@dataclass
class MonitorConfig:
    window_s: float = 24 * 3600.0
    volume_items: int = 20000
    peak_items: int = 5000
    min_items: int = 200
    unique_frac: float = 0.9
    min_spread: float = 0.35
    min_eff_rank: float = 0.5
    rejected_frac: float = 0.2


@dataclass
class KeyReport:
    key_id: str
    customer: str
    revoked: bool
    used: int
    quota: int | None
    requests: int
    items: int
    peak: int
    rejected: int
    auth_failures: int
    unique: float | None
    spread: float | None
    eff_rank: float | None
    flags: list[str] = field(default_factory=list)
    verdict: str = "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def report(engine: Engine, config: MonitorConfig | None = None, now: float | None = None) -> list[KeyReport]:
    cfg = config or MonitorConfig()
    now = time.time() if now is None else now
    since = now - cfg.window_s
    with engine.connect() as conn:
        keys = list(conn.execute(select(api_keys).order_by(api_keys.c.created_at)))
        rows = list(conn.execute(select(usage).where(usage.c.window_start >= int(since))))
        sketches = list(conn.execute(select(usage_sketch).where(usage_sketch.c.window_start >= int(since))))
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r._mapping["key_id"], []).append(r._mapping)
    sk_by_key: dict[str, list] = {}
    for r in sketches:
        sk_by_key.setdefault(r._mapping["key_id"], []).append(r._mapping)
    out = []
    for k in keys:
        m = k._mapping
        rs = by_key.get(m["key_id"], [])
        requests = sum(r["requests"] for r in rs)
        items = sum(r["images"] + r["texts"] for r in rs)
        peak = max((r["images"] + r["texts"] for r in rs), default=0)
        rejected = sum(r["rejected"] for r in rs)
        uniq = sum(r["unique_inputs"] for r in rs)
        sk = sk_by_key.get(m["key_id"], [])
        n = sum(int(r["n"]) for r in sk)
        spread = eff = None
        if n:
            spread = float(sum(r["n"] * r["spread"] for r in sk) / n)
            eff = float(sum(r["n"] * r["eff_rank"] for r in sk) / n)
        auth_failures = sum(int(r.get("auth_failures") or 0) for r in rs)
        rep = KeyReport(
            key_id=m["key_id"], customer=m["customer"], revoked=m["revoked_at"] is not None, used=int(m["used"] or 0),
            quota=m["quota"], requests=requests, items=items, peak=peak, rejected=rejected, auth_failures=auth_failures,
            unique=(uniq / items) if items else None, spread=spread, eff_rank=eff,
        )
        if items >= cfg.volume_items or peak >= cfg.peak_items:
            rep.flags.append("volume")
        if (items >= cfg.min_items and rep.unique is not None and rep.unique >= cfg.unique_frac
                and spread is not None and spread >= cfg.min_spread and eff is not None and eff >= cfg.min_eff_rank):
            rep.flags.append("diversity")
        total = requests + rejected
        if total >= 10 and rejected >= cfg.rejected_frac * total:
            rep.flags.append("throttled")
        if "volume" in rep.flags and "diversity" in rep.flags:
            rep.verdict = "suspect"
        elif rep.flags:
            rep.verdict = "watch"
        out.append(rep)
    return out
