"""Tests driven by the registries: every registered method, data source, scheme and attack is
checked the moment it is registered (timm's test_models.py pattern), and a throw-away method
registered here runs through the API, the CLI and a benchmark suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ipshield import jobs
from ipshield.errors import IPShieldError
from ipshield.registry import (ATTACKS, CLASSIFIERS, DATASETS, METHODS, SCENARIOS, SUITES, WATERMARKS, MethodSpec,
                               SchemeSpec)

#: values that make any method's job tiny; applied to the fields a config has
SMOKE = {"epochs": 1, "steps": 3, "batch_size": 16, "n_train": 48, "n_test": 40, "max_train": 48, "n_pseudo": 32,
         "gen_steps": 2, "gen_batch_size": 16, "n_val": 16, "val_every": 2, "translate_steps": 1,
         "stat_steps": 1, "stat_domain_size": 16, "warmup_epochs": 0, "val_size": 8, "skip_at_chance": 0.0,
         "augment": False}

METRICS_KEYS = {"method", "authorized", "unauthorized", "n_classes", "accuracy"}


def _smoke_config(spec: MethodSpec) -> dict:
    fields = spec.config.model_fields
    return {k: v for k, v in SMOKE.items() if k in fields}


@pytest.fixture(scope="module")
def tiny_domains():
    from ipshield.data.synthetic import load_synthetic

    return load_synthetic(["clean", "inverted", "color"], n_train=64, n_test=40, seed=0)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_domains):
    from ipshield.models.classifiers import create_classifier

    torch.manual_seed(0)
    return create_classifier("vgg-tiny", tiny_domains["clean"].classes)


def test_specs_are_complete():
    """Each spec declares what the CLI, the API and the benchmarks read from it."""
    assert {"zero-shot", "coop", "ip-clip", "ntl-prompt", "sa-map", "sf-map", "df-map", "ntl", "ntl-tf", "cuti"} <= set(METHODS.names())
    for name, spec in METHODS.items():
        assert spec.module.startswith("ipshield."), name
        assert callable(spec.run) and spec.config is not None, name
        assert spec.model in ("clip", "classifier"), name
        assert set(spec.scenarios) <= set(SCENARIOS), name
        assert set(spec.data) <= {"authorized", "unauthorized"}, name
        cfg = spec.make_config()
        with pytest.raises(IPShieldError, match="unknown key"):
            spec.make_config({"no_such_key": 1})
        if "scenario" in spec.config.model_fields:
            assert cfg.scenario == spec.scenarios[0], name
            with pytest.raises(IPShieldError, match="scenario"):
                spec.check_scenario("authorization" if "authorization" not in spec.scenarios else "nonsense")
    for name, spec in DATASETS.items():
        assert callable(spec.load) and callable(spec.domains), name
    assert DATASETS.get("synthetic").domains() == ["clean", "inverted", "color", "texture", "noisy", "outline"]
    for name, spec in WATERMARKS.items():
        assert isinstance(spec, SchemeSpec) and spec.obj is not None, name
    for name, spec in ATTACKS.items():
        assert callable(spec.run), name
    for name, spec in CLASSIFIERS.items():
        net = spec.obj(num_classes=10, image_size=32)
        out = net(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 10), name
        out.sum().backward()
        assert any(p.grad is not None for p in net.parameters()), name
    with pytest.raises(IPShieldError, match="unknown protection method 'nope'"):
        METHODS.get("nope")


def test_digit_folder_offers_every_archive(tmp_path, digits_root):
    """A fourth archive in the digits folder is a domain like the others (``--domains`` default)."""
    import shutil

    for n in ("mnist", "usps"):
        shutil.copy(digits_root / f"{n}.npz", tmp_path / f"{n}.npz")
    shutil.copy(digits_root / "usps.npz", tmp_path / "usps2.npz")
    assert DATASETS.get("digits").domains(root=tmp_path) == ["mnist", "usps", "usps2"]
    from ipshield.cli.common import load_source

    doms = load_source("digits", tmp_path, None)
    assert set(doms) == {"mnist", "usps", "usps2"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_saves_and_reloads(name, tiny_domains, tiny_classifier, small_clip, tmp_path):
    """A tiny job of every registered method through ``jobs.protect``: the run folder holds
    run.json (done), config.yaml (the config, reloadable), metrics.json (the schema) and the
    artifacts, which reload to the same accuracy."""
    spec = METHODS.get(name)
    out = tmp_path / "run"
    model = small_clip if spec.model == "clip" else tiny_classifier
    scenario = spec.scenarios[0] if spec.scenarios else None
    unauth = ["inverted"] if scenario == "target-specified" else []
    before = {k: v.clone() for k, v in tiny_classifier.state_dict().items()}
    m = jobs.protect(name, domains=tiny_domains, authorized="clean", unauthorized=unauth, out=out, model=model,
                     config=_smoke_config(spec), verbose=False)
    assert METRICS_KEYS <= set(m), name
    assert set(m["accuracy"]) == {"before", "after"}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["method"] == m["method"] and on_disk["accuracy"] == json.loads(json.dumps(m["accuracy"]))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["kind"] == f"protect-{name}"
    cfg = spec.config.build(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.to_dict() == spec.make_config(_smoke_config(spec)).to_dict()
    after = m["accuracy"]["after"]
    if spec.model == "classifier":
        from ipshield.models.classifiers import load_classifier
        from ipshield.protect.restrict import evaluate

        for k, v in tiny_classifier.state_dict().items():  # the source model is never changed
            assert torch.equal(v, before[k]), (name, k)
        reloaded = load_classifier(out, classes=tiny_domains["clean"].classes)
        again = evaluate(reloaded, {d: tiny_domains[d] for d in after}, cfg.n_test, cfg.seed, cfg.image_size)
        assert again == pytest.approx(after, abs=1e-6), name
    elif name != "zero-shot":
        again = jobs.evaluate(out, {d: tiny_domains[d] for d in tiny_domains}, model=small_clip)
        for d in tiny_domains:
            assert again[d] == pytest.approx(after[d], abs=1e-6), (name, d)


def test_run_folder_refuses_a_finished_run_and_marks_failures(tiny_domains, small_clip, tmp_path):
    out = tmp_path / "coop"
    cfg = {"epochs": 1, "max_train": 32, "augment": False}
    jobs.protect("coop", domains=tiny_domains, authorized="clean", out=out, model=small_clip, config=cfg, verbose=False)
    with pytest.raises(IPShieldError, match="finished"):
        jobs.protect("coop", domains=tiny_domains, authorized="clean", out=out, model=small_clip,
                     config={**cfg, "epochs": 2}, verbose=False)
    m = jobs.protect("coop", domains=tiny_domains, authorized="clean", out=out, model=small_clip,
                     config={**cfg, "epochs": 2}, overwrite=True, verbose=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2  # config.yaml matches metrics.json
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == json.loads(json.dumps(m["accuracy"]))

    # a job that fails leaves run.json "failed" with the reason, and a rerun of it is allowed
    def boom(job, config):
        raise RuntimeError("the method broke")

    METHODS.register("test-boom", config=METHODS.get("coop").config, model="clip", data=("authorized",), scenarios=())(boom)
    try:
        with pytest.raises(RuntimeError):
            jobs.protect("test-boom", domains=tiny_domains, authorized="clean", out=tmp_path / "b", model=small_clip)
        info = json.loads((tmp_path / "b" / "run.json").read_text())
        assert info["status"] == "failed" and "the method broke" in info["reason"]

        def interrupted(job, config):
            raise KeyboardInterrupt

        METHODS.unregister("test-boom")
        METHODS.register("test-boom", config=METHODS.get("coop").config, model="clip", data=("authorized",),
                         scenarios=())(interrupted)
        with pytest.raises(KeyboardInterrupt):
            jobs.protect("test-boom", domains=tiny_domains, authorized="clean", out=tmp_path / "b", model=small_clip)
        info = json.loads((tmp_path / "b" / "run.json").read_text())
        assert info["status"] == "interrupted" and "Ctrl-C" in info["reason"]
    finally:
        METHODS.unregister("test-boom")


def test_bad_options_are_clear_errors(tiny_domains, small_clip, tmp_path):
    with pytest.raises(IPShieldError, match="epochs must be at least 1"):
        jobs.protect("coop", domains=tiny_domains, authorized="clean", out=tmp_path / "r", model=small_clip,
                     overrides=["epochs=-3"])
    assert not (tmp_path / "r").exists()  # nothing written for a config error
    with pytest.raises(IPShieldError, match="does not support the scenario 'ownership'"):
        jobs.protect("ntl-tf", domains=tiny_domains, authorized="clean", scenario="ownership")
    with pytest.raises(IPShieldError, match="needs at least one unauthorized"):
        jobs.protect("sa-map", domains=tiny_domains, authorized="clean")
    with pytest.raises(IPShieldError, match="unknown domain"):
        jobs.protect("coop", domains=tiny_domains, authorized="nowhere")
    with pytest.raises(IPShieldError, match="'auto', 'cpu' or 'cuda'"):
        jobs.protect("coop", domains=tiny_domains, authorized="clean", model=small_clip, device="tpu")


# ---------------------------------------------------------------------------- a throw-away method


class _EchoConfig(METHODS.get("zero-shot").config):  # zero-shot's config (templates) plus a seed
    seed: int = 0


def _echo_job(job, config):
    """A 'protection' that serves zero-shot CLIP and reports it as protected (a throw-away)."""
    from ipshield.metrics import summarize_restriction
    from ipshield.protect.zeroshot import evaluate_zero_shot

    acc = evaluate_zero_shot(job.model, job.domains, config=config)
    n = len(job.authorized_domain.classes)
    if job.out is not None:
        (job.out / "echo.txt").write_text("nothing learned\n")
    return {"method": "test-echo", "authorized": job.authorized, "unauthorized": job.unauthorized, "n_classes": n,
            "accuracy": {"before": acc, "after": acc},
            "summary": summarize_restriction(acc, acc, job.authorized, n, job.unauthorized)}


@pytest.fixture
def echo_method():
    METHODS.register("test-echo", config=_EchoConfig, model="clip", data=("authorized", "unauthorized"),
                     scenarios=("target-specified",), description="a throw-away method of the tests")(_echo_job)
    yield METHODS.get("test-echo")
    METHODS.unregister("test-echo")


def test_throwaway_method_through_api_cli_and_suite(echo_method, small_clip, small_clip_dir, tmp_path, capsys):
    from ipshield import api

    assert echo_method.module == __name__
    assert "test-echo" in api.methods()
    from ipshield.data.synthetic import load_synthetic

    doms = load_synthetic(["clean", "inverted"], n_train=32, n_test=40, seed=0)
    m = api.protect("test-echo", domains=doms, authorized="clean", unauthorized=["inverted"], out=tmp_path / "api",
                    model=small_clip)
    assert m["method"] == "test-echo" and (tmp_path / "api" / "echo.txt").is_file()

    from ipshield.cli import main

    try:
        main(["protect", "test-echo", "--model", str(small_clip_dir), "--authorized", "clean", "--unauthorized",
              "inverted", "--domains", "clean,inverted", "--out", str(tmp_path / "cli"), "--no-coop"])
    except SystemExit as e:  # main() returns on success; an exit must be a clean one
        assert e.code in (0, None)
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["method"] == "test-echo"
    assert "run folder" in capsys.readouterr().out

    from ipshield.bench.harness import SuiteConfig, run_suite

    suite = SuiteConfig.build({"name": "echo", "source": "synthetic", "data": {"n_train": 32, "n_test": 40},
                               "domains": ["clean", "inverted"], "pairs": [["clean", "inverted"]],
                               "model": str(small_clip_dir), "device": "cpu",
                               "methods": [{"name": "coop", "config": {"epochs": 1, "max_train": 32, "augment": False}},
                                           {"name": "test-echo"}]})
    res = run_suite(suite, tmp_path / "suite", show_progress=False)
    assert not res.failed
    cells = [json.loads(p.read_text()) for p in (tmp_path / "suite" / "cells").glob("*.json")]
    assert any(c["method"] == "test-echo" for c in cells)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_data_source_lists_and_loads_its_domains(name, request, tmp_path):
    """``domains(**options)`` names what ``load`` gives, for every registered source."""
    spec = DATASETS.get(name)
    if name == "synthetic":
        options = {"n_train": 8, "n_test": 4}
    elif name == "digits":
        options = {"root": request.getfixturevalue("digits_root"), "n_train": 8, "n_test": 4}
    elif name == "folder":
        import numpy as np
        from PIL import Image

        for dom in ("photos", "sketches"):
            for cls in ("cat", "dog"):
                (tmp_path / dom / cls).mkdir(parents=True)
                for i in range(5):
                    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / dom / cls / f"{i}.png")
        options = {"root": tmp_path}
    else:  # a source registered later: it must load its domains with no options
        options = {}
    names = spec.domains(**{k: v for k, v in options.items() if k == "root"})
    assert names, name
    doms = spec.load(names[:2], **options)
    assert list(doms) == names[:2], name
    for d in doms.values():
        assert len(d.train) > 0 and len(d.test) > 0 and d.classes, (name, d.name)
