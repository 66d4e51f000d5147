"""The owner's page: ``GET /admin`` (HTML) and ``GET /admin/api/summary`` (the same data as JSON).

Both need an owner key (``api_keys.admin = 1``); the app's gate checks it before any of this runs.
They show:
- the keys: id, customer, status (active/revoked, owner), the limits in force (the key's own or the
  server's defaults), embeddings served, when created and last used. Never a key or its hash.
- usage over the last 24 h and the extraction monitor's flags and verdict per key
  (``ipshield.serve.monitor.report``);
- the suspect monitor's checks (``ipshield.serve.suspects.history``, newest first).
The page is plain HTML with inline CSS: no script, no external asset, every value escaped, sent
with ``Cache-Control: no-store`` and a Content-Security-Policy that allows nothing but its own
inline style. A section whose query fails says so; the others still show.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import time
from typing import Any

log = logging.getLogger("ipshield.serve")

HISTORY_LIMIT = 100
WINDOW_S = 24 * 3600.0
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# CSS classes for known verdicts only (a value never becomes a class name)
_VERDICT_CLASS = {"ok": "good", "not-detected": "good", "watch": "warn", "inconclusive": "warn",
                  "suspect": "bad", "stolen": "bad", "error": "err"}


# ----------------------------------------------------------------------------- the data
def _section(name: str, fn) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # one failing query leaves the rest of the page
        log.error("owner's page: %s unavailable (%s)", name, type(exc).__name__)
        return None, f"unavailable ({type(exc).__name__})"


def summary(svc, now: float | None = None, history_limit: int = HISTORY_LIMIT) -> dict:
    """Everything the page shows, JSON-safe (blocking: database reads; run it in a thread)."""
    from ipshield.serve.monitor import MonitorConfig, report
    from ipshield.serve.suspects import history

    now = time.time() if now is None else float(now)
    s = svc.settings
    flush = getattr(svc, "flush", None)
    if flush is not None:
        flush()  # the evidence still in memory, so the page is current (it logs its own failures)

    def keys() -> list[dict]:
        out = []
        for rec in svc.store.list():
            rate, burst = svc.limits(rec)
            quota = rec.quota if rec.quota is not None else s.default_quota
            out.append({
                "key_id": rec.key_id, "customer": rec.customer, "status": "revoked" if rec.revoked else "active",
                "admin": bool(rec.admin), "rate": rate, "burst": burst, "quota": quota,
                "defaults": [n for n, v in (("rate", rec.rate), ("burst", rec.burst), ("quota", rec.quota)) if v is None],
                "used": int(rec.used), "created_at": rec.created_at, "last_used_at": rec.last_used_at,
            })
        return out

    def usage() -> list[dict]:
        return [r.to_dict() for r in report(svc.engine, MonitorConfig(window_s=WINDOW_S), now=now)]

    k, k_err = _section("keys", keys)
    u, u_err = _section("usage", usage)
    h, h_err = _section("suspect checks", lambda: history(svc.engine, limit=history_limit))
    totals = None
    if u is not None:
        totals = {f: sum(int(r[f]) for r in u) for f in ("requests", "items", "rejected", "auth_failures")}
        totals["flagged_keys"] = sum(1 for r in u if r["verdict"] != "ok")
    return {
        "generated_at": now,
        "service": {"model": svc.model_name, "dim": svc.dim, "watermark": svc.transform is not None,
                    "batching": bool(s.batching)},
        "keys": k, "usage_window_s": WINDOW_S, "usage": u, "usage_totals": totals, "suspect_checks": h,
        "errors": {n: e for n, e in (("keys", k_err), ("usage", u_err), ("suspect_checks", h_err)) if e},
    }


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


# ----------------------------------------------------------------------------- the page
def _e(v) -> str:
    return html.escape("-" if v is None else str(v), quote=True)


def _when(t) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(float(t), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(v, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _p(v) -> str:
    return _num(v, "{:.3g}")


def _limit(v, default: bool) -> str:
    text = "unlimited" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))
    return text + (" (default)" if default else "")


def _verdict(v: str) -> str:
    cls = _VERDICT_CLASS.get(v)
    return f'<span class="v {cls}">{_e(v)}</span>' if cls else _e(v)


def _table(tid: str, caption: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    """``rows`` hold cells that are already HTML (escaped by the caller)."""
    th = "".join(f'<th scope="col">{_e(h)}</th>' for h in head)
    if rows:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    else:
        body = f'<tr><td class="empty" colspan="{len(head)}">{_e(empty)}</td></tr>'
    return f'<table id="{tid}"><caption>{_e(caption)}</caption><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
:root{color-scheme:light;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#f6f7f9}
body{margin:0 auto;max-width:1400px;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.45rem;margin:.2rem 0}h2{font-size:1.1rem;margin:2rem 0 .5rem}
p.meta{color:#57606a;margin:.2rem 0 1rem}
.cards{display:flex;flex-wrap:wrap;gap:.75rem;margin:1rem 0}
.card{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:.6rem .9rem;min-width:9rem}
.card b{display:block;font-size:1.3rem}.card span{color:#57606a;font-size:.85rem}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dee4;font-size:.88rem}
caption{text-align:left;color:#57606a;padding:.3rem 0;caption-side:top}
th,td{padding:.35rem .55rem;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}tr:nth-child(even) td{background:#fafbfc}
td.empty{color:#57606a;font-style:italic}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em}
.v{display:inline-block;padding:.05rem .45rem;border-radius:10px;font-weight:600;font-size:.8rem}
.good{background:#dafbe1;color:#116329}.warn{background:#fff8c5;color:#7d4e00}
.bad{background:#ffebe9;color:#a40e26}.err{background:#f3e8ff;color:#6e40c9}
.note{color:#57606a;max-width:32rem}.problem{color:#a40e26}
"""


def render_page(data: dict) -> str:
    """The HTML of the owner's page from ``summary()`` (every value escaped)."""
    svc = data["service"]
    errors = data.get("errors", {})
    parts = []
    totals = data.get("usage_totals") or {}
    checks = data.get("suspect_checks") or []
    latest: dict = {}
    for c in checks:  # newest first: the first row of a suspect is its latest check
        latest.setdefault(c["suspect"], c["verdict"])
    stolen = sum(1 for v in latest.values() if v == "stolen")
    cards = [(len(data.get("keys") or []), "API keys"), (totals.get("requests", "-"), "requests, 24 h"),
             (totals.get("items", "-"), "embeddings, 24 h"), (totals.get("rejected", "-"), "rejected, 24 h"),
             (totals.get("flagged_keys", "-"), "keys flagged"), (stolen, "suspects found stolen (latest check)")]
    parts.append('<div class="cards">' + "".join(f"<div class=\"card\"><b>{_e(v)}</b><span>{_e(t)}</span></div>"
                                                  for v, t in cards) + "</div>")

    parts.append("<h2>API keys</h2>")
    if errors.get("keys"):
        parts.append(f'<p class="problem">keys: {_e(errors["keys"])}</p>')
    rows = []
    for k in data.get("keys") or []:
        status = k["status"] + (", owner" if k["admin"] else "")
        rows.append([f"<code>{_e(k['key_id'])}</code>", _e(k["customer"]), _e(status),
                     _e(_limit(k["rate"], "rate" in k["defaults"])), _e(_limit(k["burst"], "burst" in k["defaults"])),
                     _e(_limit(k["quota"], "quota" in k["defaults"])), _e(k["used"]), _e(_when(k["created_at"])),
                     _e(_when(k["last_used_at"]))])
    parts.append(_table("keys", "Keys: never the key itself or its hash", ["key id", "customer", "status", "rate/s", "burst",
                        "quota", "used", "created", "last used"], rows, "no keys"))

    parts.append("<h2>Usage, last 24 h, and the extraction monitor</h2>")
    if errors.get("usage"):
        parts.append(f'<p class="problem">usage: {_e(errors["usage"])}</p>')
    rows = []
    for r in data.get("usage") or []:
        rows.append([f"<code>{_e(r['key_id'])}</code>", _e(r["customer"]), _e(r["requests"]), _e(r["items"]), _e(r["peak"]),
                     _e(r["rejected"]), _e(r["auth_failures"]), _e(_num(r["unique"])), _e(_num(r["spread"])),
                     _e(_num(r["eff_rank"])), _e(", ".join(r["flags"]) or "-"), _verdict(r["verdict"])])
    parts.append(_table("usage", "Per key: requests, embeddings, peak per audit window, rejections, failed "
                        "authentications, distinct-input share, spread, effective rank, flags, verdict",
                        ["key id", "customer", "requests", "items", "peak/window", "rejected", "auth failures", "unique",
                         "spread", "eff. rank", "flags", "verdict"], rows, "no keys"))

    parts.append("<h2>Suspect checks</h2>")
    if errors.get("suspect_checks"):
        parts.append(f'<p class="problem">suspect checks: {_e(errors["suspect_checks"])}</p>')
    rows = []
    for c in checks:
        rows.append([_e(_when(c["checked_at"])), _e(c["suspect"]), _e(c["scheme"]), _verdict(c["verdict"]),
                     _e(_p(c["p_trigger"])), _e(_p(c["p_distribution"])), _e(c["queries"]), _e(c["customer"]),
                     f'<span class="note">{_e(c["detail"])}</span>'])
    parts.append(_table("checks", "Verifications of suspect APIs (ipshield monitor run), newest first",
                        ["when", "suspect", "scheme", "verdict", "p trigger", "p distribution", "queries", "customer", "note"],
                        rows, "no checks yet: run `ipshield monitor run`"))

    meta = (f"model {_e(svc['model'])} (dim {_e(svc['dim'])}), watermark {'on' if svc['watermark'] else 'off'}, "
            f"batching {'on' if svc['batching'] else 'off'}; generated {_e(_when(data['generated_at']))}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta name=\"robots\" content=\"noindex\">"
            f"<title>ipshield: owner's page</title><style>{_CSS}</style></head><body>"
            f"<h1>ipshield embedding service</h1><p class=\"meta\">{meta}</p>" + "".join(parts) + "</body></html>\n")


# ----------------------------------------------------------------------------- the routes
def install_admin(app, svc) -> None:
    """Add ``GET /admin`` and ``GET /admin/api/summary`` to the app (the gate admits owner keys only)."""
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    async def _data() -> dict:
        return await run_in_threadpool(summary, svc)

    @app.get("/admin", response_class=HTMLResponse, tags=["admin"], summary="The owner's page (an owner key)")
    async def admin_page():
        data = await _data()
        page = await run_in_threadpool(render_page, data)
        return HTMLResponse(page, headers=HEADERS)

    @app.get("/admin/api/summary", tags=["admin"], summary="The owner's page as JSON (an owner key)")
    async def admin_summary():
        data = await _data()
        return JSONResponse(_json_safe(data), headers=HEADERS)
