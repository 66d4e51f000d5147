"""The attack contract (``ATTACKS``): every entry's config and budget, the one ``run(target, config,
**inputs)`` signature, clear errors for bad inputs, and the attack job's run folder. Tiny data only:
a synthetic domain of a few images and an untrained ``vgg-tiny``."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError, DataError, IPShieldError
from ipshield.registry import ATTACKS


@pytest.fixture(scope="module")
def domain():
    from ipshield.data.synthetic import load_synthetic

    return load_synthetic(["clean"], n_train=20, n_test=20, seed=0)["clean"]


@pytest.fixture()
def clf(domain):
    from ipshield.models.classifiers import create_classifier

    torch.manual_seed(0)
    return create_classifier("vgg-tiny", domain.classes).eval()


class ToyEmbedder:
    """A black-box embedding service of 16 dimensions (no weights)."""

    embed_dim = 16

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def embed_images(self, images):
        return F.normalize(torch.randn(len(images), self.embed_dim, generator=self.g), dim=-1)

    def embed_texts(self, texts):
        return F.normalize(torch.randn(len(list(texts)), self.embed_dim, generator=self.g), dim=-1)


def _public(n: int = 12):
    from ipshield.watermark.base import ReferenceSample

    return ReferenceSample(torch.rand(n, 3, 8, 8), [f"caption {i}" for i in range(n)])


FAST = {"finetune": ["steps=2", "k=10", "n_test=10"], "shot": ["steps=2", "n_train=10", "n_test=10", "refresh_every=1"]}


# ------------------------------------------------------------------------------ the contract
def test_every_attack_has_a_config_with_a_budget():
    from ipshield.attacks.domain import TARGET_KINDS, AttackConfig

    names = ATTACKS.names()
    assert {"finetune", "shot", "wm-extract", "wm-rotate", "wm-permute", "wm-signed-permute", "wm-noise",
            "wm-dim-removal", "wm-prune", "wm-finetune"} <= set(names)
    for spec in ATTACKS.specs():
        assert spec.description, spec.name
        assert spec.target in TARGET_KINDS, spec.name
        assert isinstance(spec.config, type) and issubclass(spec.config, AttackConfig), spec.name
        assert issubclass(spec.config, BaseConfig)
        assert spec.budget and spec.budget in spec.config.model_fields, spec.name
        assert spec.config.budget_field == spec.budget, spec.name
        default = spec.make_config()
        assert getattr(default, spec.budget) > 0, spec.name
        params = list(inspect.signature(spec.run).parameters.values())
        assert [p.name for p in params[:2]] == ["target", "config"], spec.name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), f"{spec.name}: inputs are keyword-only"
        with pytest.raises(ConfigError, match="unknown key 'no_such_key'") as exc:
            spec.make_config({"no_such_key": 1})
        assert spec.config.__name__ in exc.value.fix
        for bad in (0, -1):
            with pytest.raises(ConfigError, match=spec.budget) as exc:
                spec.make_config({spec.budget: bad})
            assert exc.value.fix and f"{spec.budget}=" in exc.value.fix, (spec.name, exc.value.fix)
            assert "\n" not in exc.value.problem
        with pytest.raises(ConfigError):  # the same through key=value overrides (the CLI's --set)
            spec.make_config({}, [f"{spec.budget}=0"])


def test_one_name_per_attack_in_the_bench_and_the_report():
    """The watermark bench's rows and the report's labels use the registry's names."""
    import re
    from pathlib import Path

    import ipshield.bench.watermark as bench
    from ipshield.report.html import WM_LABELS

    names = set(ATTACKS.names())
    assert set(WM_LABELS) <= names
    rows = set(re.findall(r'add\("([\w-]+)"', Path(bench.__file__).read_text())) - {"none"}
    assert rows and rows <= names, rows - names


# ------------------------------------------------------------------------------ bad inputs
def test_an_attack_refuses_a_target_of_another_kind(clf):
    from ipshield.attacks.domain import target_kind
    from ipshield.jobs.attack import attack
    from ipshield.watermark.base import CleanEncoder

    assert target_kind(clf) == "classifier" and target_kind(ToyEmbedder()) == "embedder"
    assert target_kind(CleanEncoder.__new__(CleanEncoder)) == "embedder"
    with pytest.raises(IPShieldError, match="attack 'finetune' takes an image classifier, not an embedding service") as exc:
        attack("finetune", target=ToyEmbedder(), domain=None)
    assert "wm-rotate" in exc.value.fix  # the attacks that do take it
    with pytest.raises(IPShieldError, match="attack 'wm-rotate' takes an embedding service") as exc:
        ATTACKS.get("wm-rotate").run(clf, None)
    assert "finetune" in exc.value.fix and "shot" in exc.value.fix

    class PromptModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter = torch.nn.Linear(2, 2)

    assert target_kind(PromptModel()) == "prompt"
    with pytest.raises(IPShieldError, match="not a CLIP prompt model"):
        attack("shot", target=PromptModel(), domain=None)
    with pytest.raises(IPShieldError, match="no model ipshield can attack"):
        attack("shot", target="a string", domain=None)


def test_k_larger_than_the_labelled_images_is_a_clear_error(clf, domain):
    from ipshield.jobs.attack import attack

    with pytest.raises(DataError, match=r"k=50 labelled images asked for, but domain 'clean' has only 20") as exc:
        attack("finetune", target=clf, domain=domain, overrides=["k=50", "steps=1"])
    assert "k <= 20" in exc.value.fix
    # the old call style says the same
    from ipshield.attacks.domain import finetune_attack

    with pytest.raises(DataError, match="has only 20"):
        finetune_attack(clf, domain, k=21)


def test_a_budget_of_zero_or_below_is_a_config_error(clf, domain):
    from ipshield.attacks.domain import finetune_attack
    from ipshield.attacks.watermark import apply_attack
    from ipshield.jobs.attack import attack, cost_to_break

    with pytest.raises(ConfigError, match="budget k .* must be greater than 0 \\(got 0\\)"):
        attack("finetune", target=clf, domain=domain, overrides=["k=0"])
    with pytest.raises(ConfigError, match="budget n_train|n_train must be at least 1"):
        attack("shot", target=clf, domain=domain, config={"n_train": -5})
    with pytest.raises(ConfigError, match="k"):
        cost_to_break(clf, domain, ks=[10, 0], shot=False)
    with pytest.raises(ConfigError, match="k"):
        finetune_attack(clf, domain, k=-1)
    with pytest.raises(ConfigError, match="strength"):
        apply_attack("wm-noise", ToyEmbedder(), 0.0)
    with pytest.raises(ConfigError, match="strength"):
        apply_attack("wm-prune", ToyEmbedder(), 1.5)


def test_missing_or_unknown_inputs_are_named(clf, domain):
    from ipshield.jobs.attack import attack

    with pytest.raises(IPShieldError, match="attack 'finetune' needs the input\\(s\\) domain") as exc:
        attack("finetune", target=clf)
    assert "domain=" in exc.value.fix
    with pytest.raises(IPShieldError, match="takes no input\\(s\\) public"):
        attack("finetune", target=clf, domain=domain, public=_public())
    with pytest.raises(IPShieldError, match="needs the input\\(s\\) public"):
        attack("wm-dim-removal", target=ToyEmbedder())
    with pytest.raises(IPShieldError, match="unknown attack 'nope'") as exc:
        attack("nope", target=clf)
    assert "finetune" in exc.value.fix
    with pytest.raises(IPShieldError, match="black-box embedder"):
        attack("wm-prune", target=ToyEmbedder())
    with pytest.raises(ConfigError, match="is not the config of attack 'finetune'"):
        from ipshield.attacks.domain import SHOTAttackConfig

        attack("finetune", target=clf, domain=domain, config=SHOTAttackConfig())


# ------------------------------------------------------------------------------ the attack job
def test_classifier_attack_through_the_job_writes_its_run_folder(clf, domain, tmp_path):
    from ipshield.jobs.attack import attack
    from ipshield.models.classifiers import load_classifier

    before = {k: v.clone() for k, v in clf.state_dict().items()}
    out = tmp_path / "ft"
    r = attack("finetune", target=clf, out=out, domain=domain, overrides=FAST["finetune"], seed=3)
    assert r["attack"] == "finetune" and r["k"] == 10 and isinstance(r["model"], torch.nn.Module)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())  # the target is not modified
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["kind"] == "attack-finetune" and info["seed"] == 3
    m = json.loads((out / "metrics.json").read_text())
    assert m["attack"] == "finetune" and m["budget"] == "k" and m["k"] == 10 and m["domain"] == "clean"
    assert 0 <= m["acc_before"] <= 100 and 0 <= m["acc_after"] <= 100 and "model" not in m
    assert "k: 10" in (out / "config.yaml").read_text() and "seed: 3" in (out / "config.yaml").read_text()
    back = load_classifier(out / "model", classes=domain.classes)  # the attacked copy
    assert torch.allclose(back.predict_logits(domain.test.to_tensor(32)[:4]),
                          r["model"].cpu().predict_logits(domain.test.to_tensor(32)[:4]), atol=1e-5)
    # a finished run is refused unless overwrite
    with pytest.raises(IPShieldError, match="already holds a finished 'attack-finetune' run"):
        attack("finetune", target=clf, out=out, domain=domain, overrides=FAST["finetune"])
    r2 = attack("shot", target=clf, out=out, domain=domain, overrides=FAST["shot"], overwrite=True)
    assert r2["attack"] == "shot" and r2["n_train"] == 10
    assert json.loads((out / "metrics.json").read_text())["attack"] == "shot"
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_a_failing_attack_marks_its_run_failed(clf, domain, tmp_path):
    from ipshield.jobs.attack import attack

    out = tmp_path / "bad"
    # k is checked against the data inside the attack: the run folder is open when it fails
    with pytest.raises(DataError):
        attack("finetune", target=clf, out=out, domain=domain, overrides=["k=25", "steps=1"])
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "k=25" in info["reason"]
    assert not (out / "metrics.json").exists()

    def boom(target, config, *, domain):
        raise RuntimeError("the attack broke")

    ATTACKS.register("test-boom", config=ATTACKS.get("finetune").config, target="classifier", budget="k",
                     description="always fails")(boom)
    try:
        with pytest.raises(RuntimeError):
            attack("test-boom", target=clf, out=tmp_path / "boom", domain=domain)
    finally:
        ATTACKS.unregister("test-boom")
    info = json.loads((tmp_path / "boom" / "run.json").read_text())
    assert info["status"] == "failed" and "the attack broke" in info["reason"]
    # a failed run is redone in place by the same command, and replaced by another only with overwrite
    with pytest.raises(IPShieldError, match="unfinished 'attack-finetune' run \\(failed\\) with another configuration"):
        attack("finetune", target=clf, out=out, domain=domain, overrides=["k=20", "steps=1", "n_test=10"])
    attack("finetune", target=clf, out=out, domain=domain, overrides=["k=20", "steps=1", "n_test=10"], overwrite=True)
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_cost_to_break_skips_a_k_too_large_and_writes_a_run(clf, domain, tmp_path):
    from ipshield.jobs.attack import cost_to_break

    r = cost_to_break(clf, domain, ks=[5, 500], shot=True, out=tmp_path / "c", overrides=["steps=1", "n_test=10"],
                      shot_overrides=["steps=1", "n_train=10", "n_test=10"])
    assert r["finetune_k500"] is None and r["skipped"]["k"] == [500] and 0 <= r["finetune_k5"] <= 100
    assert 0 <= r["shot"] <= 100
    assert json.loads((tmp_path / "c" / "run.json").read_text())["status"] == "done"
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["finetune_k5"] == r["finetune_k5"]
    with pytest.raises(ConfigError, match="k is set by the list"):
        cost_to_break(clf, domain, ks=[5], overrides=["k=3"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        cost_to_break(clf, domain, ks=[5], shot_overrides=["nope=1"])


# ------------------------------------------------------------------------------ watermark attacks
def test_watermark_attacks_through_the_spec():
    from ipshield.attacks.watermark import (NoisyEmbedder, TransformedEmbedder, apply_attack, permute,
                                            random_permutation, random_rotation, rotate)

    emb = ToyEmbedder()
    r = ATTACKS.get("wm-rotate").run(emb, {"seed": 7})
    assert r["attack"] == "wm-rotate" and r["strength"] == 1.0 and isinstance(r["model"], TransformedEmbedder)
    assert torch.equal(r["model"].matrix, rotate(emb, seed=7, dim=16).matrix)  # the old call, the same matrix
    assert r["model"].name == "wm-rotate"
    # a partial rotation: orthogonal, and the identity outside a subspace of half the dimensions
    m = random_rotation(16, seed=3, strength=0.5).double()
    assert torch.allclose(m @ m.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert torch.linalg.matrix_rank(m - torch.eye(16, dtype=torch.float64), atol=1e-5) <= 8
    p = random_permutation(16, seed=3, signs=True, strength=0.25)
    assert int((p.abs().diagonal() == 1).sum()) >= 12 and torch.equal(p.abs().sum(0), torch.ones(16))
    assert torch.equal(permute(emb, dim=16, signs=True).matrix, random_permutation(16, 12345, True))
    signed = apply_attack("wm-signed-permute", emb, 1.0)
    assert signed.name == "wm-signed-permute" and (signed.matrix < 0).any()
    noisy = apply_attack("wm-noise", emb, 0.5, seed=1)
    assert isinstance(noisy, NoisyEmbedder) and noisy.strength == 0.5
    out = ATTACKS.get("wm-dim-removal").run(emb, {"strength": 2}, public=_public())["model"]
    e = out.embed_images(torch.rand(3, 3, 8, 8))
    assert e.shape == (3, 16) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ConfigError, match="only 16"):
        ATTACKS.get("wm-dim-removal").run(emb, {"strength": 16}, public=_public())


# ------------------------------------------------------------------------------ the command line
def test_cli_attack_commands(clf, domain, tmp_path, capsys):
    """`ipshield attack NAME` for every classifier attack (generated from the registry) and the
    cost-to-break command `ipshield attack finetune --k ... --shot/--no-shot`."""
    from ipshield.cli import attack_app, main as cli_main

    def main(argv) -> int:
        try:
            cli_main(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    import typer.main

    commands = set(typer.main.get_command(attack_app).commands)
    assert {s.name for s in ATTACKS.specs() if s.target == "classifier"} | {"extract"} <= commands
    clf.save(tmp_path / "clf")
    base = ["--model", str(tmp_path / "clf"), "--domain", "clean", "--source", "synthetic"]
    capsys.readouterr()
    # bad budgets and keys: exit 2 with the fix, before any data is loaded
    assert main(["attack", "finetune", *base, "--k", "10,0"]) == 2
    err = capsys.readouterr().err
    assert "budget k" in err and "fix:" in err
    assert main(["attack", "shot", *base, "--set", "nope=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert main(["attack", "shot", *base, "--set", "n_train=0"]) == 2
    assert "n_train" in capsys.readouterr().err
    assert main(["attack", "shot", "--model", str(tmp_path / "none"), "--domain", "clean", "--source", "synthetic"]) == 2
    # a generic classifier attack with a run folder
    out = tmp_path / "shot"
    assert main(["attack", "shot", *base, "--set", "steps=1", "--set", "n_train=10", "--set", "n_test=10",
                 "--seed", "4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["attack"] == "shot" and m["n_train"] == 10 and json.loads((out / "run.json").read_text())["status"] == "done"
    assert (out / "model" / "classifier.json").is_file()
    assert main(["attack", "shot", *base, "--set", "steps=1", "--out", str(out)]) == 2  # finished: refused
    assert "--overwrite" in capsys.readouterr().err
    # the cost to break: a k larger than the domain's images is skipped and said so
    out = tmp_path / "cost"
    assert main(["attack", "finetune", *base, "--k", "5,5000", "--no-shot", "--set", "steps=1", "--set", "n_test=10",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "finetune_k5:" in text and "skipped k=5000" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["finetune_k5000"] is None and m["finetune_k5"] is not None and "shot" not in m
