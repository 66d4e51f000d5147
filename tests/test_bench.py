"""Benchmark harness (suites, resumable cells, tables) and the self-contained HTML report.

Most tests register fast stand-in cell runners (numbers computed from the cell, with a spread over
seeds) so the harness itself is what is tested; one test runs the real zero-shot and CoOp cells on
the small CLIP; one renders the report in headless chromium when it is installed.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from ipshield.bench import harness as H
from ipshield.errors import ConfigError, IPShieldError
from ipshield.report.suite import run_suite_with_report

REPO = Path(__file__).resolve().parents[1]

CALLS: list[str] = []


def _stand_in(strength: float):
    """A fake protection: Acc_u falls by ``strength`` of its headroom above chance, Acc_a by a
    little; a deterministic spread over seeds; an embedding map and attack results like the real
    runners write."""

    def runner(cell: H.Cell) -> dict:
        CALLS.append(cell.key)
        rng = np.random.default_rng(zlib.crc32(f"{cell.authorized}>{cell.unauthorized}".encode()) + 17 * cell.seed)
        before = {cell.authorized: 90.0 + rng.normal(0, 1), cell.unauthorized: 60.0 + rng.normal(0, 2)}
        after = {cell.authorized: before[cell.authorized] - strength * 2.0 - rng.uniform(0, 0.5),
                 cell.unauthorized: before[cell.unauthorized] - strength * (before[cell.unauthorized] - 10.0) + rng.uniform(0, 2)}
        from ipshield.metrics import summarize_restriction

        m = {"method": cell.runner, "authorized": cell.authorized, "unauthorized": [cell.unauthorized], "n_classes": 10,
             "accuracy": {"before": before, "after": after}, "reference": "stand-in",
             "summary": summarize_restriction(before, after, cell.authorized, 10, [cell.unauthorized])}
        if strength > 0:
            m["attacks"] = {"acc_u_source": before[cell.unauthorized], "acc_u_protected": after[cell.unauthorized],
                            "finetune_k10": after[cell.unauthorized] + 5, "finetune_k100": after[cell.unauthorized] + 20,
                            "shot": after[cell.unauthorized] + 3}
        if cell.embedding_map:
            feats = np.concatenate([rng.normal(0, 1, (40, 10)), rng.normal(2, 1, (40, 10))])
            protected = feats.copy()
            protected[40:] = 0.2 * protected[40:] + 5.0  # the unauthorized images collapse to one spot
            np.savez_compressed(cell.out / "embedding.npz", before=H.pca_2d(feats), after=H.pca_2d(protected),
                                domain=np.repeat([0, 1], 40).astype(np.int8), label=np.tile(np.arange(10), 8).astype(np.int16))
            m["embedding_map"] = {"file": str((cell.out / "embedding.npz").relative_to(cell.ctx.out)),
                                  "domains": [cell.authorized, cell.unauthorized], "before_name": "ref", "after_name": cell.method,
                                  "representation": "stand-in"}
        return m

    return runner


@pytest.fixture
def stand_ins():
    CALLS.clear()
    H.register_cell("test-weak")(_stand_in(0.3))
    H.register_cell("test-strong")(_stand_in(0.95))
    H.register_cell("test-none")(_stand_in(0.0))
    yield CALLS
    for name in ("test-weak", "test-strong", "test-none", "test-boom"):
        H.CELL_RUNNERS.pop(name, None)


SUITE = """
name: tiny
description: stand-in methods on two pairs
source: synthetic
pairs: ["clean:inverted", "color:texture"]
seeds: [0, 1]
methods:
  - test-none
  - name: weak
    runner: test-weak
  - name: strong
    runner: test-strong
    config: {epochs: 1}
embedding_map: strong
"""


def _suite(tmp_path: Path, text: str = SUITE) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(text)
    return p


def test_suite_runs_writes_tables_report_and_resumes(tmp_path, stand_ins):
    out = tmp_path / "run"
    res = run_suite_with_report(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    assert len(stand_ins) == 3 * 2 * 2 and len(res.computed) == 12 and not res.failed
    for f in ("results.csv", "summary.csv", "results.md", "report.html", "suite.yaml", "run.json"):
        assert (out / f).is_file(), f
    assert len(list((out / "cells").glob("*.json"))) == 12

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12
    strong = [r for r in rows if r["method"] == "strong"]
    # the table holds the runner's numbers: Drop_u = before - after, per cell
    for r in strong:
        assert float(r["drop_u"]) == pytest.approx(float(r["acc_u_before"]) - float(r["acc_u_after"]))
    summary = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert float(summary["strong"]["acc_u_after"]) < float(summary["weak"]["acc_u_after"]) < float(summary["test-none"]["acc_u_after"])
    assert float(summary["strong"]["balanced_score"]) > float(summary["weak"]["balanced_score"])
    assert summary["strong"]["acc_a_after_std"] != ""  # two seeds: a spread is reported

    md = (out / "results.md").read_text()
    assert "| strong |" in md and "±" in md and "Drop_u ↑" in md and "ST-D ↓" in md and "Cost to break" in md

    page = (out / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    alts = {a for a, _ in images}
    assert {"accuracy before and after per pair", "metric spread over seeds", "cost to break", "embedding map"} <= alts
    import base64

    for _, b64 in images:  # each is a real PNG
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing external
    assert "<script" not in page

    # a rerun computes nothing and gives the same tables
    before_csv = (out / "results.csv").read_text()
    stand_ins.clear()
    res2 = run_suite_with_report(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    assert stand_ins == [] and res2.computed == [] and len(res2.reused) == 12
    assert (out / "results.csv").read_text() == before_csv


def test_interrupted_run_resumes_without_recomputing(tmp_path, stand_ins):
    strong = H.CELL_RUNNERS["test-strong"]
    n = {"calls": 0}

    def interrupted(cell):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt
        return strong(cell)

    H.register_cell("test-strong")(interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        H.run_suite(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    finished = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert len(finished) == 8  # seed 0 (6 cells) + seed 1 first pair: test-none and weak; strong was interrupted
    first_calls = list(stand_ins)

    H.register_cell("test-strong")(strong)
    stand_ins.clear()
    res = run_suite_with_report(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    assert sorted(res.computed) == sorted(stand_ins) and len(stand_ins) == 4
    assert not set(stand_ins) & set(finished)
    assert set(first_calls) | set(stand_ins) >= {k for k in res.reused + res.computed}
    assert len(list((out / "cells").glob("*.json"))) == 12


def test_changed_method_config_recomputes_only_that_method(tmp_path, stand_ins):
    out = tmp_path / "run"
    res = H.run_suite(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    assert res.report is None and not (out / "report.html").exists()  # the harness alone writes no report
    stand_ins.clear()
    H.run_suite(_suite(tmp_path, SUITE.replace("{epochs: 1}", "{epochs: 2}")), out, show_progress=False,
                log=lambda m: None)
    assert len(stand_ins) == 4 and all(k.startswith("strong__") for k in stand_ins)


def test_failed_cell_is_reported_and_retried(tmp_path, stand_ins):
    def boom(cell):
        raise RuntimeError("numerical trouble")

    H.register_cell("test-boom")(boom)
    suite = SUITE.replace("  - test-none\n", "  - test-none\n  - name: boom\n    runner: test-boom\n")
    out = tmp_path / "run"
    res = run_suite_with_report(_suite(tmp_path, suite), out, show_progress=False, log=lambda m: None)
    assert len(res.failed) == 4 and len(res.computed) == 12
    assert (out / "cells" / "boom__clean__inverted__s0.error.txt").read_text().count("numerical trouble") >= 1
    assert "Failed cells" in (out / "report.html").read_text()
    H.register_cell("test-boom")(H.CELL_RUNNERS["test-none"])
    res = run_suite_with_report(_suite(tmp_path, suite), out, show_progress=False, log=lambda m: None)
    assert len(res.computed) == 4 and not res.failed and not list((out / "cells").glob("*.error.txt"))


@pytest.mark.parametrize("text, expected", [
    (SUITE + "seedz: [3]\n", "unknown key 'seedz'"),
    (SUITE.replace("  - test-none\n", "  - name: test-none\n    confg: {a: 1}\n"), "unknown key 'methods.0.confg'"),
    (SUITE.replace('pairs: ["clean:inverted", "color:texture"]', 'pairs: ["clean:clean"]'), "same domain twice"),
    (SUITE.replace("embedding_map: strong", "embedding_map: nope"), "not a method of the suite"),
    (SUITE.replace("    runner: test-weak\n", "    runner: test-weak\n  - name: weak\n"), "must be unique"),
    (SUITE + "digits: {ownership: true}\n", "bench digits --ownership"),
])
def test_bad_suite_is_a_clear_error(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        H.resolve_suite(_suite(tmp_path, text))
    assert expected in str(e.value.problem)


def test_unknown_runner_and_suite_names(tmp_path, stand_ins):
    with pytest.raises(ConfigError, match="unknown method runner"):
        H.run_suite(_suite(tmp_path, SUITE.replace("runner: test-weak", "runner: mapp")), tmp_path / "r", show_progress=False)
    with pytest.raises(ConfigError, match="unknown suite 'nosuch'"):
        H.resolve_suite("nosuch")


def test_builtin_suites_validate():
    suites = H.builtin_suites()
    assert {"embedded", "digits", "digits-clip", "smoke"} <= set(suites)
    for name in suites:
        cfg = H.resolve_suite(name)
        assert all(H.runner_for(m.runner_name) is not None for m in cfg.methods), name
    from ipshield.registry import SUITES

    assert set(suites) <= set(SUITES.names())  # every built-in suite is a registry entry
    assert len(H.resolve_suite("digits").pair_list()) == 6


def test_aggregate_mean_and_std_over_seeds():
    rows = [{"method": "m", "authorized": a, "unauthorized": "u", "seed": s, "drop_a": v, "st_d": None}
            for (a, s, v) in [("a", 0, 1.0), ("b", 0, 3.0), ("a", 1, 4.0), ("b", 1, 6.0)]]
    (agg,) = H.aggregate(rows)
    # per seed mean over the pairs: 2.0 and 5.0 -> mean 3.5, sample std 2.1213
    assert agg["drop_a"] == pytest.approx(3.5) and agg["drop_a_std"] == pytest.approx(math.sqrt(4.5))
    assert agg["st_d"] is None and agg["seeds"] == 2 and agg["pairs"] == 2


def test_cli_fallback_report_command_and_errors(tmp_path, stand_ins, capsys):
    from ipshield.cli import main

    out = tmp_path / "run"
    main(["bench", str(_suite(tmp_path)), "--out", str(out), "--quiet"])  # `ipshield bench SUITE`
    assert len(stand_ins) == 12 and (out / "report.html").is_file()
    (out / "report.html").unlink()
    main(["report", str(out), "--out", str(tmp_path / "again.html")])
    assert "data:image/png;base64," in (tmp_path / "again.html").read_text()

    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE + "seedz: [1]\n")
    with pytest.raises(SystemExit) as e:
        main(["bench", "run", str(bad), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'seedz'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nothing-here")])
    assert e.value.code == 2


def _fake_digits_bench(folder: Path) -> None:
    rows, attacks = [], []
    for m, u_after in (("sa-map", 11.0), ("ntl", 14.0)):
        for a, u in (("mnist", "usps"), ("usps", "mnist")):
            rows.append({"method": m, "authorized": a, "unauthorized": u, "acc_a_before": 98.0, "acc_a_after": 97.5,
                         "acc_u_before": 70.0, "acc_u_after": u_after, "drop_a": 0.5, "drop_u": 70 - u_after,
                         "st_d": 0.5 / (70 - u_after), "seed": 0})
            attacks.append({"method": m, "authorized": a, "unauthorized": u, "acc_u_source": 70.0, "acc_u_protected": u_after,
                            "finetune_k10": u_after + 10, "finetune_k100": 60.0, "shot": u_after + 2, "seed": 0})
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"kind": "bench-digits", "status": "done"}))
    (folder / "metrics.json").write_text(json.dumps({"rows": rows, "attacks": attacks}))


def _fake_watermark(folder: Path) -> None:
    def attacks(scale):
        rows = [{"attack": "none", "strength": 0, "zero_shot_mean": 80.0, "p_value": 1e-30, "p": {}, "verdict": "stolen"}]
        for s in (0.5, 1.0, 2.0):
            rows.append({"attack": "wm-noise", "strength": s, "zero_shot_mean": 80 - 5 * s, "p_value": 10 ** (-20 * scale / s), "p": {}})
        for s in (2, 8, 32):
            rows.append({"attack": "wm-dim-removal", "strength": s, "zero_shot_mean": 80 - s / 2, "p_value": 10 ** (-12 * scale / s ** 0.5), "p": {}})
        rows.append({"attack": "wm-rotate", "strength": "random", "zero_shot_mean": 80.0, "p_value": 1e-25, "p": {}})
        return rows

    res = {"config": {"alpha": 1e-6}, "model": "m"}
    for scheme, scale in (("vlpmarker", 1.0), ("embmarker", 0.3)):
        res[scheme] = {"attacks": attacks(scale), "extraction": [{"p_value": 1e-12, "verdict": "stolen"}],
                       "innocents": [{"p_value": 0.4}] * 10, "false_positive_rate": 0.0,
                       "identification": {"student": {"identified": "customer-3", "true": "customer-3"}}}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(res))


def test_report_from_digits_bench_folder_with_watermark(tmp_path):
    from ipshield.report.html import write_report

    _fake_digits_bench(tmp_path / "digits")
    _fake_watermark(tmp_path / "wm")
    path = write_report(tmp_path / "digits", tmp_path / "r.html", watermark_run=tmp_path / "wm")
    page = path.read_text()
    for alt in ("accuracy before and after per pair", "cost to break", "watermark p-values"):
        assert f'alt="{alt}" src="data:image/png;base64,' in page
    assert "fine-tune k=100" in page and "customer-3" in page
    # the digits rows come through with their numbers (mean over the 2 pairs: Acc_u after 11.0 for SA-MAP)
    assert re.search(r"<td class=\"l\">sa-map</td><td class=\"l\">2</td>.*?<td[^>]*>11\.0</td>", page)
    with pytest.raises(IPShieldError, match="not a finished `ipshield bench watermark` folder"):
        write_report(tmp_path / "digits", tmp_path / "r2.html", watermark_run=tmp_path / "digits")


def test_real_clip_cells_zero_shot_coop_and_embedding_map(tmp_path, small_clip_dir):
    """The built-in zero-shot and CoOp cell runners on the small CLIP: CoOp's "before" is the
    zero-shot cell's accuracy (same model, same images), the embedding map is saved."""
    suite = f"""
name: real
source: synthetic
data: {{n_train: 60, n_test: 40, seed: 0}}
domains: [clean, inverted]
pairs: ["clean:inverted"]
seeds: [0]
model: {small_clip_dir}
device: cpu
embedding_points: 30
methods:
  - zero-shot
  - name: coop
    config: {{epochs: 1, augment: false, batch_size: 32, max_train: 60}}
"""
    out = tmp_path / "run"
    res = run_suite_with_report(_suite(tmp_path, suite), out, show_progress=False, log=lambda m: None)
    assert len(res.computed) == 2 and not res.failed
    zs = json.loads((out / "cells" / "zero-shot__clean__inverted__s0.json").read_text())
    coop = json.loads((out / "cells" / "coop__clean__inverted__s0.json").read_text())
    assert coop["accuracy"]["before"] == pytest.approx(zs["accuracy"]["after"])
    for acc in (zs["accuracy"]["after"], coop["accuracy"]["after"]):
        assert set(acc) == {"clean", "inverted"} and all(0 <= v <= 100 for v in acc.values())
    with np.load(out / coop["embedding_map"]["file"]) as z:
        assert z["before"].shape == (60, 2) and z["after"].shape == (60, 2) and (z["domain"] == 1).sum() == 30
        assert np.isfinite(z["before"]).all()
    assert list((out / "shared" / "coop").glob("clean-s0-*/prompt.safetensors"))
    assert 'alt="embedding map"' in (out / "report.html").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed (apt-get install -y chromium) — the headless render check is skipped")
def test_report_renders_in_headless_chromium(tmp_path, stand_ins):
    out = tmp_path / "run"
    run_suite_with_report(_suite(tmp_path), out, show_progress=False, log=lambda m: None)
    shot = tmp_path / "shot.png"
    r = subprocess.run([str(REPO / "scripts" / "check_report.sh"), str(out / "report.html"), str(shot)],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    m = re.search(r"images decoded in the browser: (\d+)/(\d+)", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 4
    from PIL import Image

    assert Image.open(shot).size == (1280, 2000)
