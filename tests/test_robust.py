"""The attack suite against domain restriction of classifiers (``ipshield.attacks.robust``): the
NTLBench fine-tuning strategies, source-domain fine-tuning, TransNTL-style repair, the JailNTL-style
disguise, NRC; their honest references (from scratch, unprotected) and margins; the bad inputs;
the CLI; and a SMOKE run of the robust benchmark (tiny sizes, synthetic domains)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ipshield.errors import ConfigError, DataError, IPShieldError
from ipshield.registry import ATTACKS

SUITE = ("finetune-initfc-all", "finetune-initfc-fc", "finetune-direct-fc", "finetune-direct-all", "source-finetune",
         "transntl", "disguise", "shot", "nrc")
TINY = {"finetune-initfc-all": {"steps": 2}, "finetune-initfc-fc": {"steps": 2}, "finetune-direct-fc": {"steps": 2},
        "finetune-direct-all": {"steps": 2}, "source-finetune": {"steps": 2, "fraction": 0.25},
        "transntl": {"steps": 2, "fraction": 0.25}, "shot": {"steps": 2, "n_train": 20},
        "nrc": {"steps": 2, "n_train": 20}, "disguise": {"fraction": 0.25, "n_unlabelled": 20, "surrogate_steps": 2,
                                                         "steps": 3, "query_every": 1, "refresh_steps": 1}}


@pytest.fixture(scope="module")
def doms():
    from ipshield.data.synthetic import load_synthetic

    return load_synthetic(["clean", "inverted"], n_train=40, n_test=20, seed=0)


@pytest.fixture()
def clf(doms):
    from ipshield.models.classifiers import create_classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return create_classifier("vgg-tiny", doms["clean"].classes).eval()


def test_the_suite_is_registered_with_budgets():
    from ipshield.attacks.robust import ROBUST_ATTACKS, classifier_attacks, reference_kind

    assert set(ROBUST_ATTACKS) == set(SUITE) and set(SUITE) <= set(classifier_attacks())
    assert "finetune" not in classifier_attacks()  # the old name of finetune-direct-all
    assert ATTACKS.get("finetune").config is ATTACKS.get("finetune-direct-all").config
    budgets = {n: ATTACKS.get(n).budget for n in SUITE}
    assert budgets["finetune-initfc-fc"] == "k" and budgets["transntl"] == "fraction" and budgets["disguise"] == "fraction"
    assert budgets["nrc"] == "n_train" and budgets["source-finetune"] == "fraction"
    assert [reference_kind(n) for n in ("finetune-direct-fc", "source-finetune", "nrc")] == ["unauthorized", "authorized", "chance"]
    for n in ("source-finetune", "transntl", "disguise"):
        with pytest.raises(ConfigError, match="fraction"):
            ATTACKS.get(n).make_config({"fraction": 1.5})


@pytest.mark.parametrize("name", SUITE)
def test_every_attack_runs_and_leaves_the_target_alone(name, clf, doms):
    from ipshield.jobs.attack import attack

    before = {k: v.clone() for k, v in clf.state_dict().items()}
    inputs = {"domain": doms["inverted"]}
    if name in ("source-finetune", "transntl", "disguise"):
        inputs["authorized"] = doms["clean"]
    cfg = {**TINY[name], "n_test": 10, **({"k": 10} if name.startswith("finetune-") else {})}
    r = attack(name, target=clf, config=cfg, **inputs)
    assert r["attack"] == name and 0 <= r["acc_after"] <= 100 and isinstance(r["model"], torch.nn.Module)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    if name == "disguise":
        assert r["queries"] > 0 and r["model"].target is not clf


def test_fc_strategies_train_only_the_final_layer(clf, doms):
    from ipshield.attacks.domain import finetune_attack

    for strategy, reinit in (("direct-fc", False), ("initfc-fc", True)):
        r = finetune_attack(clf, doms["inverted"], {"k": 10, "steps": 2, "n_test": 10}, strategy=strategy)
        a, b = clf.state_dict(), r["model"].state_dict()
        changed = {k for k in a if not torch.equal(a[k], b[k].cpu())}
        assert changed and all(k.startswith("net.head") for k in changed), (strategy, changed)
    r = finetune_attack(clf, doms["inverted"], {"k": 10, "steps": 2, "n_test": 10})
    assert r["attack"] == "finetune" and r["strategy"] == "direct-all"
    with pytest.raises(ConfigError, match="unknown fine-tuning strategy"):
        finetune_attack(clf, doms["inverted"], {"k": 10}, strategy="all")


def test_bad_inputs_are_clear_errors(clf, doms):
    from ipshield.jobs.attack import attack

    with pytest.raises(IPShieldError, match="needs the attacker's authorized") as exc:
        attack("disguise", target=clf, domain=doms["inverted"])
    assert "authorized=" in exc.value.fix and "--authorized" in exc.value.fix
    with pytest.raises(IPShieldError, match="authorized"):
        attack("transntl", target=clf, domain=doms["inverted"], overrides=["steps=1"])
    with pytest.raises(DataError, match="k=50 labelled images asked for") as exc:
        attack("finetune-initfc-fc", target=clf, domain=doms["inverted"], overrides=["k=50"])
    assert "k <= 40" in exc.value.fix
    for name in ("finetune-direct-fc", "disguise", "nrc"):
        budget = ATTACKS.get(name).budget
        with pytest.raises(ConfigError, match=f"budget {budget}"):
            attack(name, target=clf, domain=doms["inverted"], overrides=[f"{budget}=0"])
    with pytest.raises(DataError, match="no image at all"):
        attack("source-finetune", target=clf, domain=doms["inverted"], authorized=doms["clean"], overrides=["fraction=0.001"])

    class PromptModel(torch.nn.Module):  # a CLIP prompt model: not a classifier
        def __init__(self):
            super().__init__()
            self.adapter = torch.nn.Linear(2, 2)

    with pytest.raises(IPShieldError, match="attack 'nrc' takes an image classifier, not a CLIP prompt model"):
        attack("nrc", target=PromptModel(), domain=doms["inverted"])


def test_references_margin_and_labels_to_match(clf, doms):
    from ipshield.attacks.domain import scratch_attack
    from ipshield.attacks.robust import (attack_grid, labels_rows, labels_to_reach, protection_margin, robust_rows,
                                         scratch_grid)

    # labels to match: 0 when already there, log-k interpolation, None past the grid
    assert labels_to_reach([10, 100, 1000], [50, 70, 90], 40, acc0=45) == 0
    assert labels_to_reach([10, 100, 1000], [50, 70, 90], 80, acc0=10) == pytest.approx(10 ** 2.5)
    assert labels_to_reach([10, 100, 1000], [50, 70, 90], 30, acc0=10) == pytest.approx(5.0)
    assert labels_to_reach([10, 100], [50, 70], 95, acc0=10) is None
    assert protection_margin(60.0, 65.0) == -5.0 and protection_margin(None, 1.0) is None
    # the scratch reference is the same architecture with fresh weights
    r = scratch_attack(clf, doms["inverted"], {"k": 10, "steps": 1, "n_test": 10})
    assert r["attack"] == "scratch" and r["n"] == 10
    assert not torch.equal(r["model"].net.head[-1].weight, clf.net.head[-1].weight)
    attacks = ["finetune-initfc-fc", "source-finetune", "shot"]
    opts = {a: TINY[a] for a in attacks}
    grid = attack_grid(clf, doms["inverted"], doms["clean"], attacks, [5, 10, 500], opts, n_test=10)
    assert grid["finetune-initfc-fc_k500"] is None and "finetune-initfc-fc_k500" in grid["skipped"]
    refs = scratch_grid(clf, doms["inverted"], doms["clean"], attacks, [5, 10], opts, n_test=10)
    assert set(refs) == {"chance", "scratch_k5", "scratch_k10", "scratch_source-finetune"} and refs["chance"] == 10.0
    row = {**grid, "method": "m", "authorized": "clean", "unauthorized": "inverted", "acc_u_protected": grid["acc_before"],
           "acc_u_source": 50.0}
    rows = robust_rows(row, row, refs, attacks, [5, 10])
    assert [(r["attack"], r["k"]) for r in rows] == [("finetune-initfc-fc", 5), ("finetune-initfc-fc", 10),
                                                    ("source-finetune", None), ("shot", None)]
    assert rows[0]["margin"] == pytest.approx(rows[0]["attacked"] - refs["scratch_k5"])
    assert rows[3]["scratch"] == 10.0 and rows[2]["scratch"] == refs["scratch_source-finetune"]
    lab = labels_rows(row, attacks, [5, 10])
    assert len(lab) == 1 and lab[0]["attack"] == "finetune-initfc-fc"


def test_cli_attacks_with_authorized_images(clf, doms, tmp_path, capsys):
    from ipshield.cli import main as cli_main

    def main(argv) -> int:
        try:
            cli_main(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    clf.save(tmp_path / "clf")
    base = ["--model", str(tmp_path / "clf"), "--domain", "inverted", "--source", "synthetic"]
    capsys.readouterr()
    assert main(["attack", "disguise", *base]) == 2  # no authorized images: the fix, no traceback
    err = capsys.readouterr().err
    assert "authorized" in err and "--authorized" in err and "Traceback" not in err
    assert main(["attack", "finetune-initfc-all", *base, "--set", "k=0"]) == 2
    assert "budget k" in capsys.readouterr().err
    out = tmp_path / "tn"
    assert main(["attack", "transntl", *base, "--authorized", "clean", "--set", "steps=1", "--set", "n_test=10",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["attack"] == "transntl" and m["authorized"] == "clean" and m["budget"] == "fraction"
    # the cost-to-break command reports the from-scratch reference and the margin
    out = tmp_path / "cost"
    assert main(["attack", "finetune", *base, "--k", "5", "--no-shot", "--set", "steps=1", "--set", "n_test=10",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scratch_k5:" in text and "margin_k5:" in text


def test_robust_bench_smoke(tmp_path):
    """The robust benchmark end to end on two synthetic domains with tiny sizes: every attack of the
    suite on the source model and one protection, the references, the tables and robust.html."""
    from ipshield.bench.digits import DigitsBenchConfig, run_digits_bench

    torch.set_num_threads(1)
    cfg = DigitsBenchConfig.smoke(
        pairs=[("clean", "inverted")], methods=["ntl"], source="synthetic", data={"n_train": 60, "n_test": 30, "seed": 0},
        arch="vgg-tiny", n_train=60, n_test=30, source_epochs=1, steps=2, ks=[5, 10], attack_steps=2, shot_steps=2,
        robust="all", attack_options=TINY, method_options={})
    res = run_digits_bench(tmp_path, cfg, log=lambda m: None)
    from ipshield.report.html import write_report, write_robust_reports  # the report layer draws robust.html

    assert write_robust_reports(tmp_path) == [tmp_path / "robust.html"]
    assert 'href="robust.html"' in write_report(tmp_path).read_text()  # the main report links it
    for name in ("robust.csv", "robust-labels.csv", "robust.md", "robust.json", "robust.html", "attacks.md", "results.md"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "robust.json").read_text())
    rows = data["rows"]
    assert {r["attack"] for r in rows} == set(SUITE)
    assert {r["method"] for r in rows} == {"source (unprotected)", "ntl"}
    ntl = [r for r in rows if r["method"] == "ntl"]
    assert len(ntl) == 4 * 2 + 5
    for r in ntl:
        assert r["scratch"] is not None and r["unprotected"] is not None, r
        assert math.isclose(r["margin"], r["attacked"] - r["scratch"])
    html = (tmp_path / "robust.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "margin" in html
    md = (tmp_path / "attacks.md").read_text()
    assert "from scratch k=5" in md and "margin k=5" in md
    assert res["attacks"][0]["method"] == "source (unprotected)"
    # a rerun reuses every cell
    res2 = run_digits_bench(tmp_path, cfg, log=lambda m: None)
    assert res2["computed"] == []


def test_bench_cells_keep_every_attack_figure():
    """A suite cell's ``attacks`` keeps the robust suite's figures (each attack, its from-scratch
    reference and margin), not only the classic fine-tuning and SHOT columns."""
    from types import SimpleNamespace

    from ipshield.bench.harness import _attack_dict

    bench = SimpleNamespace(cfg=SimpleNamespace(attack_steps=5, shot_steps=3))
    row = {"method": "sa-map", "authorized": "mnist", "unauthorized": "usps", "seconds": 1.0, "seed": 0,
           "acc_u_source": 80.0, "acc_u_protected": 9.0, "finetune_k10": 70.0, "shot": 40.0,
           "finetune-initfc-fc_k10": 50.0, "transntl": 30.0, "disguise": 20.0, "nrc": 35.0, "scratch_k10": 45.0,
           "margin_k10": 25.0}
    out = _attack_dict(row, bench)
    assert {"finetune-initfc-fc_k10", "transntl", "disguise", "nrc", "scratch_k10", "margin_k10"} <= set(out)
    assert not {"method", "authorized", "unauthorized", "seconds", "seed"} & set(out)
    assert out["attack_steps"] == 5 and out["shot_steps"] == 3
