"""Non-fine-tunable restriction (issue 18): the simulated attacker of ``ipshield.protect.simft``,
``sophon`` and MAP's ``finetune_sims`` option, and method variants in the benchmark suites (the
``digits-nft`` suite runs SA-MAP twice, with and without the option). Tiny sizes, synthetic
domains, an untrained ``vgg-tiny``; the measured figures are in docs/map.md."""

from __future__ import annotations

import pytest
import torch

from ipshield.errors import ConfigError


@pytest.fixture(scope="module")
def doms():
    from ipshield.data.synthetic import load_synthetic

    return load_synthetic(["clean", "inverted"], n_train=60, n_test=20, seed=0)


@pytest.fixture()
def clf(doms):
    from ipshield.models.classifiers import create_classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return create_classifier("vgg-tiny", doms["clean"].classes).eval()


def _xy(domain, n=40):
    from ipshield.protect.restrict import train_tensors

    return train_tensors(domain, n, 32, 0)


def test_the_simulated_attacker_fine_tunes_a_copy_and_scores_it_on_other_images(clf, doms):
    from ipshield.protect.simft import SimPool, SimulatedAttacker, final_linear, finetuned_restricted_grads

    x, y = _xy(doms["inverted"])
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    pool = SimPool(x, y, SimulatedAttacker(steps=2, k=5, batch_size=8), g)
    inner, (ox, _) = pool.draw()
    assert inner.n == 5 and len(ox) == 8  # k images to fine-tune on, a batch of others to score
    names = [n for n, _ in clf.named_parameters()]
    head = {id(p) for p in final_linear(clf).parameters()}
    for prob, head_has_grad in ((1.0, False), (0.0, True)):
        pool = SimPool(x, y, SimulatedAttacker(steps=2, k=5, batch_size=8, init_fc_prob=prob), g)
        grads = dict(zip(names, finetuned_restricted_grads(clf, pool, "cpu", g)))
        for (n, p) in clf.named_parameters():
            if id(p) in head:
                assert (grads[n] is not None) == head_has_grad, n  # a re-initialised head is the attacker's, not ours
        assert any(gr is not None and gr.abs().sum() > 0 for n, gr in grads.items())
    for k, v in clf.state_dict().items():  # the protected model is never changed by the simulation
        assert torch.equal(v, before[k]), k


def test_shot_and_transntl_simulations_train_what_those_attacks_train(clf, doms):
    """``shot`` adapts on unlabelled restricted images with the final layer frozen; ``transntl``
    repairs on shifted authorized images; both are scored on restricted images and leave the
    protected model unchanged; a single kind leaves the random stream as the plain attacker's."""
    from ipshield.protect.simft import SimPool, SimulatedAttacker, final_linear, finetuned_restricted_grads

    x, y = _xy(doms["inverted"])
    xa, _ = _xy(doms["clean"])
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    head = final_linear(clf)
    seen = {}
    orig_adam = torch.optim.Adam

    def spy(params, **kw):
        params = list(params)
        seen["n_trained"] = len(params)
        seen["head_trained"] = any(p.shape == head.weight.shape for p in params)
        return orig_adam(params, **kw)

    n_params = len(list(clf.parameters()))
    for kind, head_trained in (("shot", False), ("transntl", True)):
        g = torch.Generator().manual_seed(0)
        pool = SimPool(x, y, SimulatedAttacker(steps=2, k=5, batch_size=8, kinds=((kind, 1.0),)), g, authorized=xa)
        torch.optim.Adam = spy
        try:
            grads = finetuned_restricted_grads(clf, pool, "cpu", g)
        finally:
            torch.optim.Adam = orig_adam
        assert seen["head_trained"] == head_trained, kind
        assert seen["n_trained"] == n_params - (2 if kind == "shot" else 0)
        assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads), kind
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="needs the authorized images"):
        SimPool(x, y, SimulatedAttacker(kinds=(("transntl", 1.0),)), torch.Generator())
    with pytest.raises(ValueError, match="unknown simulated attacker"):
        SimPool(x, y, SimulatedAttacker(kinds=(("jailntl", 1.0),)), torch.Generator())
    # one kind (or a zero weight on the others): no draw, the same gradients as the plain attacker
    runs = []
    for kinds in ((("finetune", 1.0),), (("finetune", 1.0), ("shot", 0.0))):
        g = torch.Generator().manual_seed(3)
        runs.append(finetuned_restricted_grads(clf, SimPool(x, y, SimulatedAttacker(steps=2, k=5, batch_size=8, kinds=kinds), g),
                                               "cpu", g))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*runs))


def test_collapse_loss_is_zero_for_identical_features_and_scale_free():
    from ipshield.protect.sophon import collapse_loss

    f_a = torch.randn(16, 8)
    assert collapse_loss(torch.ones(10, 8) * 3.0, f_a).item() == pytest.approx(0.0)
    f_u = torch.randn(10, 8)
    assert collapse_loss(f_u, f_a).item() > 0
    assert collapse_loss(5 * f_u, 5 * f_a).item() == pytest.approx(collapse_loss(f_u, f_a).item(), rel=1e-5)


def test_sophon_defaults_simulate_the_finetune_attacker():
    from ipshield.attacks.domain import FinetuneAttackConfig
    from ipshield.registry import METHODS

    cfg = METHODS.get("sophon").make_config({})
    att, atk = cfg.attacker(), FinetuneAttackConfig()
    assert (att.optimizer, att.lr, att.bn, att.augment) == ("adam", atk.lr, atk.bn_mode, atk.augment)
    assert att.k == 10
    with pytest.raises(ConfigError, match="inner_optimizer"):
        METHODS.get("sophon").make_config({"inner_optimizer": "rmsprop"})
    assert att.kinds == (("finetune", 1.0), ("shot", 0.5))  # the default simulates SHOT a third of the time
    assert METHODS.get("sophon").make_config({"inner_attacks": {"finetune": 1, "shot": 0.5}}).attacker().kinds == (
        ("finetune", 1.0), ("shot", 0.5))
    with pytest.raises(ConfigError, match="unknown simulated attacker"):
        METHODS.get("sophon").make_config({"inner_attacks": {"jailntl": 1}})
    with pytest.raises(ConfigError, match="at least one > 0"):
        METHODS.get("sophon").make_config({"inner_attacks": {"shot": 0}})


def test_sophon_with_collapse_runs_and_keeps_the_source(clf, doms):
    from ipshield.protect.sophon import protect
    from ipshield.registry import METHODS

    before = {k: v.clone() for k, v in clf.state_dict().items()}
    cfg = METHODS.get("sophon").make_config({"steps": 3, "n_train": 40, "w_collapse": 1.0, "inner_steps": 2, "inner_k": 5})
    model, info = protect(clf, cfg, doms["clean"], [doms["inverted"]])
    assert "collapse" in info["history"][0] and info["history"][0]["collapse"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k]), k
    mixed = METHODS.get("sophon").make_config({"steps": 3, "n_train": 40, "inner_steps": 2, "inner_k": 5,
                                               "inner_attacks": {"finetune": 1, "shot": 1, "transntl": 1}})
    model2, _ = protect(clf, mixed, doms["clean"], [doms["inverted"]])
    assert all(torch.isfinite(v).all() for v in model2.state_dict().values() if v.is_floating_point())


def test_map_finetune_sims_moves_the_mask_and_needs_labelled_unauthorized_images(clf, doms):
    from ipshield.protect.map import protect
    from ipshield.registry import METHODS

    base = {"steps": 4, "n_train": 40, "score_init": 0.01, "select": "last", "skip_at_chance": 0.0, "sim_steps": 2, "sim_k": 5}
    plain, _ = protect(clf, METHODS.get("sa-map").make_config(base), doms["clean"], [doms["inverted"]])
    nft, info = protect(clf, METHODS.get("sa-map").make_config({**base, "finetune_sims": 1, "w_finetuned": 50.0}),
                        doms["clean"], [doms["inverted"]])
    differs = [not torch.equal(a > 0, b > 0) or not torch.equal(a, b) for a, b in zip(plain.scores, nft.scores)]
    assert any(differs)  # the simulated attacker's gradient reached the scores
    with pytest.raises(ConfigError, match="DF-MAP has none"):
        METHODS.get("df-map").make_config({"finetune_sims": 1})
    with pytest.raises(ConfigError, match="finetune_sims must be >= 0"):
        METHODS.get("sa-map").make_config({"finetune_sims": -1})


SUITE = """
name: nft-variants
source: synthetic
data: {n_train: 60, n_test: 30, seed: 0}
pairs: ["clean:inverted"]
seeds: [0]
methods:
  - sa-map
  - {name: sa-map-nft, runner: sa-map, config: {finetune_sims: 1, sim_steps: 2, sim_k: 5}}
digits: {arch: vgg-tiny, n_train: 60, n_test: 30, source_epochs: 1, steps: 3, attacks: false,
         method_options: {sa-map: {score_init: 0.05, select: last, skip_at_chance: 0.0}}}
"""


def test_a_renamed_classifier_method_is_its_own_variant_in_a_suite(tmp_path):
    """Two entries with the same classifier runner are two methods of the digits bench (cells,
    rows, configs): the variant gets the runner's method_options, then its own config."""
    from ipshield.bench.harness import run_suite

    torch.set_num_threads(1)
    (tmp_path / "suite.yaml").write_text(SUITE)
    out = tmp_path / "run"
    run_suite(tmp_path / "suite.yaml", out, show_progress=False, log=lambda m: None)
    import yaml

    models = out / "shared" / "digits-s0" / "models"
    plain = {"config": yaml.safe_load((models / "sa-map__clean__inverted" / "config.yaml").read_text())}
    nft = {"config": yaml.safe_load((models / "sa-map-nft__clean__inverted" / "config.yaml").read_text())}
    assert plain["config"]["finetune_sims"] == 0 and nft["config"]["finetune_sims"] == 1
    assert nft["config"]["score_init"] == 0.05 and nft["config"]["sim_k"] == 5
    rows = (out / "results.csv").read_text()
    assert "sa-map-nft" in rows and "\nsa-map," in rows.replace('"', "")
    # a changed option of a method: the digits bench's saved protection cell is stale and made again
    (tmp_path / "suite.yaml").write_text(SUITE.replace("sim_k: 5", "sim_k: 6"))
    run_suite(tmp_path / "suite.yaml", out, show_progress=False, log=lambda m: None)
    again = yaml.safe_load((models / "sa-map-nft__clean__inverted" / "config.yaml").read_text())
    assert again["sim_k"] == 6
    assert yaml.safe_load((models / "sa-map__clean__inverted" / "config.yaml").read_text())["sim_k"] == 10


def test_a_changed_library_default_makes_a_suite_cell_stale(monkeypatch):
    """The harness's cell hash covers the method's config defaults, not only what the suite says: a
    release that changes ``sophon``'s defaults recomputes its cells (before, they were reused)."""
    import dataclasses

    from ipshield.bench import harness as H
    from ipshield.registry import METHODS

    suite = H.resolve_suite("digits-nft")
    entry = next(m for m in suite.methods if m.name == "sophon")
    other = next(m for m in suite.methods if m.name == "sa-map")
    before, before_other = H.cell_hash(suite, entry), H.cell_hash(suite, other)
    assert H.cell_hash(suite, entry) == before  # stable
    spec = METHODS.get("sophon")
    monkeypatch.setitem(METHODS._entries, "sophon", dataclasses.replace(spec, defaults={"w_keep": 4.0}))
    assert H.cell_hash(suite, entry) != before
    assert H.cell_hash(suite, other) == before_other
