"""Prometheus metrics of the embedding service: ``ServiceMetrics`` and ``MetricsMiddleware``.

Built on ``prometheus_client`` (no hand-written exposition). Every ``ServiceMetrics`` owns its own
``CollectorRegistry``, so several apps in one process (tests) never clash in the global registry.

Metrics (all prefixed ``ipshield_``):

- ``requests_total{route, status}``: HTTP requests by route *template* (``/v1/embed/images``, never
  the raw path) and status code. Paths that match no route are collapsed to ``route="other"``, so
  random paths cannot grow the label set.
- ``request_duration_seconds{route}``: latency histogram, buckets 1 ms .. 10 s.
- ``requests_in_flight``: requests being handled now.
- ``batch_size{kind}``: items per forward pass of the micro-batcher (``kind`` image / text).
- ``served_items_total{customer}``, ``rejected_requests_total{customer, reason}``: per customer id
  (``reason`` one of auth, rate, quota, input, other). A rejection without a known customer (an
  invalid key) is counted under ``customer="unknown"``.
- ``extraction_flag{customer, flag}``: 0/1 per customer and extraction-monitor flag (volume,
  diversity, throttled), from ``set_flags(reports)``; a customer is flagged when any of its keys is.

Labels hold route templates, status codes, fixed words and customer ids only: never an API key, a
key id, a key hash, a secret, a matrix or a trigger. Customer labels are bounded by the number of
keys; as a second line of defence a customer id that looks like an API key (``ipsk_...``) is
replaced by ``"redacted"``, ids are cut to 64 characters, and past ``max_customers`` distinct ids
the rest are counted under ``customer="other"``.

Multi-process (``uvicorn --workers N``): when ``PROMETHEUS_MULTIPROC_DIR`` is set (to an empty,
writable folder, wiped before the server starts) every worker writes its values to memory-mapped
files there and ``render()`` merges them with ``prometheus_client.multiprocess.MultiProcessCollector``,
so any worker answers ``/metrics`` for all. Limits of that mode (those of prometheus_client):
counters and histograms are summed over all workers, dead ones included (totals stay monotonic);
gauges use a per-metric mode: ``requests_in_flight`` is ``livesum`` (the sum over live workers),
``extraction_flag`` is ``livemax`` (every worker computes the same flags from the shared database);
the files of dead workers' live gauges are pruned at each ``render()`` (the pid is no longer
running), since uvicorn has no child-exit hook. Only one ``ServiceMetrics`` per process in this mode
(two would share the same files), and the variable must be set before the workers start.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the classic text format 0.0.4, which generate_latest writes (recent versions point CONTENT_TYPE_LATEST at 1.0.0)
CONTENT_TYPE = getattr(prometheus_client, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER_ROUTE = "other"
REJECT_REASONS = ("auth", "rate", "quota", "input", "other")
FLAGS = ("volume", "diversity", "throttled")
KINDS = ("image", "text")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_KEYLIKE = re.compile(r"ipsk_", re.IGNORECASE)
_MAX_LABEL = 64


def multiprocess_dir() -> str | None:
    d = os.environ.get(MULTIPROC_ENV)
    return d or None


def _use_multiprocess_values() -> None:
    """prometheus_client picks its value class when it is imported; if the variable was set after
    that (e.g. by a launcher in the same process), switch to the memory-mapped values now."""
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()


class ServiceMetrics:
    """The service's metrics in a private registry. Thread-safe (prometheus_client is)."""

    def __init__(self, namespace: str = "ipshield", max_customers: int = 10000, multiprocess: bool | None = None):
        self.multiprocess = (multiprocess_dir() is not None) if multiprocess is None else bool(multiprocess)
        if self.multiprocess:
            if multiprocess_dir() is None:
                raise ValueError(f"multiprocess metrics need {MULTIPROC_ENV} set to a writable folder")
            _use_multiprocess_values()
        self.registry = CollectorRegistry()
        self.max_customers = int(max_customers)
        self._customers: set[str] = set()
        self._flagged: set[str] = set()  # customers with flag series
        self._lock = threading.Lock()
        ns, reg = namespace, self.registry
        self.requests = Counter("requests", "HTTP requests by route template and status code",
                                ["route", "status"], namespace=ns, registry=reg)
        self.latency = Histogram("request_duration_seconds", "HTTP request latency by route template (seconds)",
                                 ["route"], namespace=ns, registry=reg, buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("requests_in_flight", "HTTP requests being handled", namespace=ns, registry=reg,
                               multiprocess_mode="livesum")
        self.batch = Histogram("batch_size", "items per forward pass of the micro-batcher", ["kind"],
                               namespace=ns, registry=reg, buckets=BATCH_BUCKETS)
        self.served_items = Counter("served_items", "embeddings served, by customer id", ["customer"],
                                    namespace=ns, registry=reg)
        self.rejected_requests = Counter("rejected_requests", "rejected requests by customer id and reason",
                                         ["customer", "reason"], namespace=ns, registry=reg)
        self.flags = Gauge("extraction_flag", "extraction-monitor flag (1 = raised) by customer id and flag",
                           ["customer", "flag"], namespace=ns, registry=reg, multiprocess_mode="livemax")

    # ------------------------------------------------------------------ labels
    def customer_label(self, customer: str | None) -> str:
        """The label for a customer id: bounded, never key-like."""
        if customer is None or customer == "":
            return "unknown"
        c = str(customer)
        if _KEYLIKE.search(c):
            return "redacted"
        c = c[:_MAX_LABEL]
        with self._lock:
            if c in self._customers:
                return c
            if len(self._customers) >= self.max_customers:
                return OTHER_ROUTE
            self._customers.add(c)
        return c

    # ------------------------------------------------------------------ what the app calls
    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(int(status))).inc()
        self.latency.labels(route=route).observe(max(0.0, float(seconds)))

    def observe_batch(self, kind: str, n_items: int) -> None:
        """One forward pass of ``n_items`` items (``kind`` image or text)."""
        self.batch.labels(kind=kind if kind in KINDS else "other").observe(int(n_items))

    def served(self, customer: str, n: int) -> None:
        """``n`` embeddings served to ``customer`` (its id, never its key)."""
        if n > 0:
            self.served_items.labels(customer=self.customer_label(customer)).inc(int(n))

    def rejected(self, customer: str | None, reason: str) -> None:
        """One rejected request; ``reason`` in auth, rate, quota, input, other (anything else -> other);
        ``customer`` None when the key was not recognised."""
        r = reason if reason in REJECT_REASONS else "other"
        self.rejected_requests.labels(customer=self.customer_label(customer), reason=r).inc()

    def set_flags(self, reports: Iterable) -> None:
        """Update ``extraction_flag`` from ``ipshield.serve.monitor.report(...)`` (a list of
        ``KeyReport``): per customer, a flag is 1 when any of its keys has it. Customers no longer in
        the reports get 0."""
        now: dict[str, set[str]] = {}
        for rep in reports:
            label = self.customer_label(getattr(rep, "customer", None))
            now.setdefault(label, set()).update(f for f in (getattr(rep, "flags", None) or []) if f in FLAGS)
        with self._lock:
            gone = self._flagged - set(now)
            self._flagged |= set(now)
        for label in gone:
            now[label] = set()
        for label, raised in now.items():
            for f in FLAGS:
                self.flags.labels(customer=label, flag=f).set(1 if f in raised else 0)

    # ------------------------------------------------------------------ exposition
    def render(self) -> tuple[bytes, str]:
        """``(body, content_type)`` of the Prometheus text format (merged over workers in
        multi-process mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE
        from prometheus_client import multiprocess

        _prune_dead_workers(multiprocess_dir())
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg), CONTENT_TYPE

    def __repr__(self) -> str:
        return f"ServiceMetrics(multiprocess={self.multiprocess}, customers={len(self._customers)})"


_LIVE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def _prune_dead_workers(path: str | None) -> None:
    """Remove the live-gauge files of workers that are no longer running."""
    if not path or not os.path.isdir(path):
        return
    from prometheus_client import multiprocess

    pids = set()
    for name in os.listdir(path):
        m = _LIVE_FILE.match(name)
        if m:
            pids.add(int(m.group(1)))
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:  # alive, another user's
            pass


def route_template(scope) -> str:
    """The matched route's template (``/v1/embed/images``), or ``"other"`` when no route matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    return OTHER_ROUTE


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and counts it by route template and status.

    ``app.add_middleware(MetricsMiddleware, metrics=service_metrics)``. Add it last (outermost) so
    that it sees the status the client gets, error handlers included."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(route_template(scope), status, time.perf_counter() - t0)
