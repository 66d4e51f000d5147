"""Prometheus metrics of the service (``ipshield.serve.metrics``) on a tiny FastAPI app of its own,
the multi-process exposition, and the bench's bare-framework floor."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ipshield.serve.metrics import MetricsMiddleware, ServiceMetrics
from ipshield.serve.monitor import KeyReport

FAKE_KEY = "ipsk_0123456789ab_" + "S" * 43


def _app(metrics: ServiceMetrics) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/embed/images")
    async def images(request: Request):
        return {"ok": True}

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"id": item_id}

    @app.get("/inflight")
    async def inflight():
        return {"n": metrics.registry.get_sample_value("ipshield_requests_in_flight")}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    @app.get("/metrics")
    async def prom():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _report(customer: str, flags: list[str], key_id: str = "0123456789ab") -> KeyReport:
    # every required field filled with 0 (counters) / None, whatever fields the report has grown
    required = {f.name: None if f.name in ("unique", "spread", "eff_rank", "quota") else 0
                for f in dataclasses.fields(KeyReport)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    required.update(key_id=key_id, customer=customer, revoked=False)
    return KeyReport(**required, flags=flags)


def test_metrics_middleware_and_exposition():
    m = ServiceMetrics()
    client = TestClient(_app(m), raise_server_exceptions=False)
    for _ in range(3):
        assert client.post("/v1/embed/images", json={"images": []}, headers={"Authorization": f"Bearer {FAKE_KEY}"}).status_code == 200
    assert client.post("/v1/embed/images", json={}, headers={"X-API-Key": FAKE_KEY}).status_code == 200
    assert client.get("/items/1").status_code == 200
    assert client.get("/items/2").status_code == 200
    assert client.get("/items/x").status_code == 422
    assert client.get("/v1/embed/images").status_code == 405  # partial match: still the template
    for i in range(20):  # random paths must not create series
        assert client.get(f"/random/{i}/{FAKE_KEY}").status_code == 404
    assert client.get("/boom").status_code == 500
    assert client.get("/inflight").json() == {"n": 1.0}

    m.observe_batch("image", 3)
    m.observe_batch("image", 40)
    m.observe_batch("text", 1)
    m.served("acme", 5)
    m.served("acme", 2)
    m.served("beta", 1)
    m.rejected("acme", "rate")
    m.rejected(None, "auth")
    m.rejected("beta", "whatever")  # unknown reasons are collapsed
    m.served(FAKE_KEY, 1)  # a key-like customer id never becomes a label
    m.set_flags([_report("acme", ["volume", "diversity"]), _report("acme", ["throttled"], "ffffffffffff"), _report("beta", [])])

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    s = _samples(text)
    req = lambda route, status: s.get(("ipshield_requests_total", (("route", route), ("status", status))))  # noqa: E731
    assert req("/v1/embed/images", "200") == 4
    assert req("/items/{item_id}", "200") == 2
    assert req("/items/{item_id}", "422") == 1
    assert req("/v1/embed/images", "405") == 1
    assert req("other", "404") == 20
    assert req("/boom", "500") == 1
    routes = {dict(k[1])["route"] for k in s if k[0] == "ipshield_requests_total"}
    assert routes == {"/v1/embed/images", "/items/{item_id}", "/inflight", "/boom", "other"}  # /metrics: counted after rendering
    # latency histogram by route, seconds
    assert s[("ipshield_request_duration_seconds_count", (("route", "/v1/embed/images"),))] == 5
    assert s[("ipshield_request_duration_seconds_bucket", (("le", "10.0"), ("route", "/v1/embed/images")))] == 5
    assert s[("ipshield_request_duration_seconds_sum", (("route", "/v1/embed/images"),))] < 10
    assert s[("ipshield_requests_in_flight", ())] == 1  # the /metrics request itself
    # batch sizes
    assert s[("ipshield_batch_size_count", (("kind", "image"),))] == 2
    assert s[("ipshield_batch_size_sum", (("kind", "image"),))] == 43
    assert s[("ipshield_batch_size_bucket", (("kind", "image"), ("le", "4.0")))] == 1
    assert s[("ipshield_batch_size_count", (("kind", "text"),))] == 1
    # per customer
    assert s[("ipshield_served_items_total", (("customer", "acme"),))] == 7
    assert s[("ipshield_served_items_total", (("customer", "beta"),))] == 1
    assert s[("ipshield_served_items_total", (("customer", "redacted"),))] == 1
    assert s[("ipshield_rejected_requests_total", (("customer", "acme"), ("reason", "rate")))] == 1
    assert s[("ipshield_rejected_requests_total", (("customer", "unknown"), ("reason", "auth")))] == 1
    assert s[("ipshield_rejected_requests_total", (("customer", "beta"), ("reason", "other")))] == 1
    flag = lambda c, f: s[("ipshield_extraction_flag", (("customer", c), ("flag", f)))]  # noqa: E731
    assert (flag("acme", "volume"), flag("acme", "diversity"), flag("acme", "throttled")) == (1, 1, 1)
    assert (flag("beta", "volume"), flag("beta", "diversity"), flag("beta", "throttled")) == (0, 0, 0)
    # no key, no secret, no header value anywhere in the exposition
    assert "ipsk_" not in text and "SSSS" not in text and "Bearer" not in text
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            assert all("ipsk" not in v.lower() for v in smp.labels.values())

    # flags clear; a customer that left the reports goes to 0
    m.set_flags([_report("beta", ["volume"])])
    s = _samples(m.render()[0].decode())
    assert s[("ipshield_extraction_flag", (("customer", "acme"), ("flag", "volume")))] == 0
    assert s[("ipshield_extraction_flag", (("customer", "beta"), ("flag", "volume")))] == 1


def test_registries_are_private_and_customers_bounded():
    a, b = ServiceMetrics(), ServiceMetrics(max_customers=2)  # two in one process: no clash
    a.served("x", 1)
    for c in ("c1", "c2", "c3", "c4"):
        b.served(c, 1)
    sa, sb = _samples(a.render()[0].decode()), _samples(b.render()[0].decode())
    assert ("ipshield_served_items_total", (("customer", "c1"),)) not in sa
    assert sb[("ipshield_served_items_total", (("customer", "other"),))] == 2
    assert len([k for k in sb if k[0] == "ipshield_served_items_total"]) == 3
    assert b.customer_label("y" * 500) == "other" and len(a.customer_label("y" * 500)) == 64


_WORKER = textwrap.dedent("""
    import os, sys
    from ipshield.serve.metrics import ServiceMetrics
    m = ServiceMetrics()
    assert m.multiprocess
    m.served("acme", int(sys.argv[1]))
    m.observe_request("/v1/embed/images", 200, 0.01)
    m.in_flight.inc()
    if sys.argv[2] == "render":
        sys.stdout.write(m.render()[0].decode())
""")


def test_multiprocess_render(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _WORKER, "3", "-"], env=env, check=True)  # a worker that has exited
    out = subprocess.run([sys.executable, "-c", _WORKER, "2", "render"], env=env, check=True, capture_output=True, text=True).stdout
    s = _samples(out)
    assert s[("ipshield_served_items_total", (("customer", "acme"),))] == 5  # counters summed over workers
    assert s[("ipshield_requests_total", (("route", "/v1/embed/images"), ("status", "200")))] == 2
    assert s[("ipshield_request_duration_seconds_count", (("route", "/v1/embed/images"),))] == 2
    assert s[("ipshield_requests_in_flight", ())] == 1  # livesum: the dead worker's gauge was pruned


@pytest.mark.timeout(120)
def test_bench_floor_quick(tmp_path):
    from ipshield.serve.bench import FLOOR, print_result, run_bench

    cfg = "watermark on, batching on"
    res = run_bench("stub", requests=40, concurrency=4, rounds=2, configs=[(cfg, True, True)], warmup=8, out=str(tmp_path))
    print_result(res)
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {cfg, FLOOR}
    assert rows[FLOOR]["n_ok"] == 40 and rows[cfg]["n_ok"] == 40 and res["total_5xx"] == 0
    assert rows[FLOOR]["server_cpu_ms_per_request"] > 0
    assert res["floor_ratios"][cfg] > 0 and res["floor_paired_ratios"][cfg] > 0
    saved = json.loads((tmp_path / "bench_serve.json").read_text())
    assert saved["floor_ratios"] == pytest.approx(res["floor_ratios"])
