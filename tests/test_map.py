"""MAP (SA/SF/DF), NTL, CUTI-domain, the domain attacks and the digits benchmark, on small real
digit subsets (MNIST authorized, USPS unauthorized). Every test checks a measured effect."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from ipshield.errors import CheckpointError, DataError, IPShieldError

pytestmark = pytest.mark.digits

N_TRAIN, N_TEST = 1000, 300


@pytest.fixture(scope="module")
def digits(digits_root):
    from ipshield.data.digits import load_digits

    return load_digits(("mnist", "usps"), root=digits_root, n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def source_model(digits):
    from ipshield.models.classifiers import train_source

    torch.set_num_threads(2)
    return train_source("vgg_small", digits["mnist"], epochs=4)


@pytest.fixture(scope="module")
def pseudo_source(source_model):
    """512 pseudo-source images from a generator trained 120 steps (shared by the SF/DF test and
    the generator test, so the generator is trained once)."""
    from ipshield.protect.map import MAPConfig, synthesize_pseudo_source

    return synthesize_pseudo_source(source_model, 10, MAPConfig(setting="sf", gen_steps=120, n_pseudo=512))


@pytest.fixture(scope="module")
def sa_run(tmp_path_factory, source_model, digits):
    from ipshield import jobs
    from ipshield.protect.map import MAPConfig

    out = tmp_path_factory.mktemp("sa") / "run"
    cfg = MAPConfig(setting="sa", steps=200, n_train=N_TRAIN)  # as given: not merged with the sa-map preset
    return out, jobs.protect("sa-map", domains={"mnist": digits["mnist"], "usps": digits["usps"]}, authorized="mnist",
                             unauthorized=["usps"], model=source_model, config=cfg, out=out, verbose=False)


def test_source_model_and_checkpoint_roundtrip(tmp_path, source_model, digits):
    from ipshield.models.classifiers import load_classifier
    from ipshield.protect.base import accuracy

    acc = accuracy(source_model, digits["mnist"].test)
    assert acc > 90.0
    source_model.save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "classifier.json").read_text())
    assert info["arch"] == "vgg-small" and info["classes"] == digits["mnist"].classes
    again = load_classifier(tmp_path / "m", classes=digits["mnist"].classes)
    assert accuracy(again, digits["mnist"].test) == acc
    with pytest.raises(CheckpointError, match="trained on classes"):
        load_classifier(tmp_path / "m", classes=[f"c{i}" for i in range(10)])
    with pytest.raises(CheckpointError, match="holds a 'vgg-small'"):
        load_classifier(tmp_path / "m", arch="resnet_small")
    info["num_classes"], info["classes"] = 5, info["classes"][:5]  # weights no longer fit the description
    (tmp_path / "m" / "classifier.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(tmp_path / "m")


def test_sa_map_collapses_unauthorized_keeps_authorized(sa_run):
    from ipshield.models.classifiers import load_classifier

    out, m = sa_run
    s = m["summary"]
    assert s["acc_u_before"]["usps"] > 60.0  # the unprotected model transfers to USPS...
    assert s["acc_u_after"]["usps"] < 30.0  # ...the masked one does not
    assert s["drop_a"] < 3.0
    assert s["st_d"] is not None and s["st_d"] < 0.06
    assert 0.0 < m["sparsity"]["overall"] < 0.2 and m["sparsity"]["per_layer"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "sa-map" and saved["unauthorized"] == ["usps"] and saved["n_classes"] == 10
    assert set(saved["accuracy"]["after"]) == {"mnist", "usps"}
    model = load_classifier(out)  # an ordinary classifier: no mask at inference
    assert sum(p.numel() for p in model.parameters() if (p == 0).all()) == 0  # no layer pruned entirely
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


def test_sa_defaults_mixture_preservation_and_val_selection(source_model, digits):
    from ipshield.protect.base import accuracy
    from ipshield.protect.map import MAPConfig, protect
    from ipshield.registry import METHODS

    # 150 steps on 1000 images: scores start nearer the threshold than the benchmark's 0.2
    cfg = METHODS.get("sa-map").make_config({"steps": 150, "n_train": N_TRAIN, "n_val": 200, "val_every": 50, "score_init": 0.1})
    assert isinstance(cfg, MAPConfig) and cfg.select == "val" and cfg.preserve_mix == 1.0 and cfg.target_topk == 2
    masked, info = protect(source_model, cfg, digits["mnist"], [digits["usps"]])
    val = next(h for h in info["history"] if "val" in h)
    assert [c["step"] for c in val["val"]] == [50, 100, 150]
    chosen = next(c for c in val["val"] if c["step"] == info["selected"])
    # the rule: lowest held-out unauthorized accuracy (within the tolerance), then best agreement
    assert chosen["acc_u"] <= min(c["acc_u"] for c in val["val"]) + cfg.val_tolerance
    assert chosen["acc_u"] < 40.0  # held-out USPS images collapse...
    acc_a, acc_u = accuracy(masked, digits["mnist"].test), accuracy(masked, digits["usps"].test)
    assert acc_u < 30.0 and acc_a > accuracy(source_model, digits["mnist"].test) - 3.0  # ...and so does the test set


def test_mask_export_equals_masked_forward(source_model):
    from ipshield.protect.map import MaskedClassifier

    masked = MaskedClassifier(source_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in masked.scores:
            s.copy_(torch.randn(s.shape, generator=g))  # about half of every layer pruned
    x = torch.rand(16, 3, 32, 32, generator=g)
    exported = masked.export()
    assert torch.allclose(masked.predict_logits(x), exported.predict_logits(x), atol=1e-5)
    assert not torch.allclose(source_model.predict_logits(x), exported.predict_logits(x), atol=1e-3)
    sp = masked.sparsity()
    assert 0.4 < sp["overall"] < 0.6
    name = masked.names[0]
    w = dict(exported.named_parameters())[name]
    assert abs(float((w == 0).float().mean()) - sp["per_layer"][name]) < 1e-6
    # the source model is untouched and the mask starts as all ones
    fresh = MaskedClassifier(source_model)
    assert torch.allclose(fresh.predict_logits(x), source_model.predict_logits(x), atol=1e-5)


def test_sf_and_df_map_reduce_unauthorized(source_model, digits, pseudo_source):
    from ipshield.protect.map import MAPConfig, run

    cfg = MAPConfig(setting="sf", steps=150, n_train=N_TRAIN, gen_steps=120, n_pseudo=512)
    x, y, info = pseudo_source
    assert x.shape == (512, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert info["source_agreement"] > 80.0  # the source model recognises the requested classes
    sf = run(cfg, source_model, digits["mnist"], [digits["usps"]], None, pseudo_source=(x, y))["summary"]
    assert sf["acc_u_before"]["usps"] - sf["acc_u_after"]["usps"] > 30.0
    assert sf["drop_a"] < 10.0
    df = run(MAPConfig(setting="df", steps=150, n_train=N_TRAIN), source_model, digits["mnist"], [digits["usps"]], None,
             pseudo_source=(x, y))["summary"]
    assert df["acc_u_before"]["usps"] - df["acc_u_after"]["usps"] > 4.0  # measured about 9: DF is weak on MNIST->USPS (docs/map.md)
    assert df["drop_a"] < 10.0


def _bn_distance(model, images):
    """The pseudo-source synthesis' BatchNorm distance of ``images`` to ``model``'s running statistics."""
    from ipshield.protect.map import _BNStatHook

    hook = _BNStatHook(model)
    with torch.no_grad():
        model(images)
    d = float(hook.pop())
    hook.remove()
    return d


def test_longer_generator_training_gives_a_closer_pseudo_source(source_model, pseudo_source):
    """The pseudo-source generator: more steps bring its images nearer the source model's stored
    BatchNorm statistics and make the source recognise the requested classes more often (the
    reason for the 1000-step default; docs/map.md, "DF-MAP: where the gap comes from")."""
    from ipshield.protect.map import MAPConfig, synthesize_pseudo_source

    short = synthesize_pseudo_source(source_model, 10, MAPConfig(setting="df", gen_steps=30, n_pseudo=256))
    long = pseudo_source  # 120 steps
    # measured (two threads): distance 6.89 -> 2.14, agreement 37.1 -> 96.9 %
    assert _bn_distance(source_model, long[0]) < 0.6 * _bn_distance(source_model, short[0])
    assert long[2]["source_agreement"] > short[2]["source_agreement"] + 20.0


def test_translate_to_source_moves_images_to_the_source_statistics(source_model, digits):
    """SF's translated pseudo-source: USPS images moved to the MNIST source's BatchNorm statistics
    get closer to them (measured by the same distance) and keep the source's predicted class."""
    from ipshield.protect.map import MAPConfig, protect, translate_to_source
    from ipshield.protect.restrict import train_tensors

    x, _ = train_tensors(digits["usps"], 256, 32, 0)
    cfg = MAPConfig(setting="sf", translate_steps=25)

    with torch.no_grad():
        y0 = source_model(x).argmax(-1)
    xt, yt, info = translate_to_source(source_model, x, cfg)
    assert xt.shape == x.shape and 0.0 <= float(xt.min()) and float(xt.max()) <= 1.0
    assert torch.equal(yt, y0)
    assert _bn_distance(source_model, xt) < 0.7 * _bn_distance(source_model, x)
    with torch.no_grad():
        assert float((source_model(xt).argmax(-1) == yt).float().mean()) > 0.95
    # the confidence guard: with an unreachable threshold nothing is moved, and the run says so
    px, py = torch.rand(64, 3, 32, 32), torch.arange(64) % 10
    _, info = protect(source_model, MAPConfig(setting="sf", steps=2, n_train=200, translate_target=100,
                                              translate_min_confidence=1.01), digits["mnist"], [digits["usps"]],
                      pseudo_source=(px, py))
    assert info["translated"]["n"] == 0
    from ipshield.errors import ConfigError

    with pytest.raises(ConfigError, match="only SF-MAP"):
        MAPConfig.build({"setting": "sa", "translate_target": 10})


def test_preserve_features_keeps_the_masked_features_near_the_source(source_model, digits):
    """The feature-preservation term: the same SF run (same pseudo-source, seed and steps) with
    ``preserve_features`` keeps the masked model's BatchNorm outputs on real authorized images
    nearer the source's, and prunes fewer weights; it is a clear error without BatchNorm."""
    from ipshield.protect.map import MAPConfig, _FeatureTap, protect
    from ipshield.protect.restrict import train_tensors

    px = torch.rand(256, 3, 32, 32)
    with torch.no_grad():
        py = source_model(px).argmax(-1)
    xa, _ = train_tensors(digits["mnist"], 256, 32, 1)

    def feature_gap(masked):
        tap = _FeatureTap(source_model)
        with torch.no_grad():
            source_model(xa)
            ref = tap.take()
            masked(xa)
            got = tap.take()
        tap.remove()
        return float(torch.stack([torch.mean((a - b) ** 2) for a, b in zip(got, ref)]).mean())

    base = dict(setting="sf", steps=80, n_train=N_TRAIN, alpha=0.5, score_init=0.1)
    m0, i0 = protect(source_model, MAPConfig(**base), None, [digits["usps"]], pseudo_source=(px, py))
    m1, i1 = protect(source_model, MAPConfig(**base, preserve_features=10.0), None, [digits["usps"]], pseudo_source=(px, py))
    assert feature_gap(m1) < 0.7 * feature_gap(m0)
    assert i1["sparsity"]["pruned"] < i0["sparsity"]["pruned"]

    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(IPShieldError, match="no BatchNorm"):
        protect(NoBN(), MAPConfig(setting="sa", steps=2, n_train=100, preserve_features=1.0), digits["mnist"], [digits["usps"]])


def test_skip_at_chance_keeps_the_model_when_there_is_nothing_to_remove(source_model, digits):
    """With ``skip_at_chance``, an unauthorized domain on which the source model is already at
    chance (USPS images with shuffled labels) trains no mask: the model stays unpruned and the run
    says why; on real USPS (source about 60-80 %) the mask is trained as usual."""
    import dataclasses

    import numpy as np

    from ipshield.protect.map import MAPConfig, protect

    usps = digits["usps"]
    labels = np.random.default_rng(0).permutation(usps.train.labels)
    shuffled = dataclasses.replace(usps, name="usps-shuffled", train=dataclasses.replace(usps.train, labels=labels))
    cfg = MAPConfig(setting="sa", steps=60, n_train=N_TRAIN, score_init=0.05, skip_at_chance=3.0)
    masked, info = protect(source_model, cfg, digits["mnist"], [shuffled])
    assert info["skipped"]["source_acc_u"] <= 13.0 and info["sparsity"]["pruned"] == 0
    masked, info = protect(source_model, cfg, digits["mnist"], [usps])
    assert "skipped" not in info and info["sparsity"]["pruned"] > 0


def test_cli_says_when_no_mask_was_trained(capsys):
    from ipshield.cli.protect import _print_classifier as _print

    summary = {"acc_a_before": 96.9, "acc_a_after": 96.9, "drop_a": 0.0, "acc_u_before": {"mnistm": 10.1},
               "acc_u_after": {"mnistm": 10.1}}
    _print({"method": "sf-map", "authorized": "usps", "summary": summary,
            "skipped": {"source_acc_u": 10.4, "chance": 10.0, "reason": "..."}})
    out = capsys.readouterr().out
    assert "no mask trained" in out and "10.4 %" in out and "skip_at_chance=0" in out
    cal = {"opacity": 0.2, "clean_accuracy": 99.3, "accuracy_by_opacity": {"0.1": 98.9, "0.2": 92.6}, "keep": 0.9}
    _print({"method": "sa-map", "authorized": "mnist", "summary": summary,
            "watermark": {"watermark": "grid", "stride": 2, "opacity": 0.2, "calibration": cal}})
    out = capsys.readouterr().out
    assert "ownership watermark: grid, stride 2, opacity 0.2 (calibrated" in out and "92.6 %" in out


def test_stat_neighbours_shift_the_feature_statistics_and_keep_the_class(source_model):
    """DF-MAP's statistics neighbours: pseudo-source batches moved to random shifts of the source
    BatchNorm statistics move away from those statistics, stay recognised as their class, and
    differ between domains (batches)."""
    from ipshield.protect.map import MAPConfig, _FeatureTap, synthesize_pseudo_source, synthesize_stat_neighbours

    cfg = MAPConfig(setting="df", gen_steps=80, n_pseudo=256, neighbours="stats", stat_shift=1.5)
    x, y, _ = synthesize_pseudo_source(source_model, 10, cfg)

    xn, info = synthesize_stat_neighbours(source_model, x, y, cfg)
    assert xn.shape == x.shape and 0.0 <= float(xn.min()) and float(xn.max()) <= 1.0
    assert info["domains"] == 4
    assert _bn_distance(source_model, xn[:64]) > 1.5 * _bn_distance(source_model, x[:64])
    with torch.no_grad():
        assert float((source_model(xn).argmax(-1) == y).float().mean()) > 0.8
    # each batch is its own domain: two domains differ at the BatchNorm layers far more than two
    # batches of the pseudo-source do
    tap = _FeatureTap(source_model)
    with torch.no_grad():
        stats = [[f.mean((0, 2, 3)) if f.dim() == 4 else f.mean(0) for f in (source_model(b), tap.take())[1]]
                 for b in (xn[:64], xn[64:128], x[:64], x[64:128])]
    tap.remove()

    def gap(a, b):
        return float(sum(torch.norm(u - v) for u, v in zip(a, b)))

    assert gap(stats[0], stats[1]) > 2.0 * gap(stats[2], stats[3])


@pytest.mark.parametrize("method,min_drop_u", [("ntl", 30.0), ("cuti", 30.0), ("ntl-tf", 12.0)])
def test_ntl_and_cuti_reduce_unauthorized(method, min_drop_u, source_model, digits):
    """Target-specified NTL and CUTI-domain train against USPS; target-free NTL never sees it
    (shifted MNIST images are its neighbourhood) and still removes part of it (measured, one
    thread: USPS 63.3 -> 40.0 %, MNIST drop -1.3)."""
    from ipshield import jobs

    s = jobs.protect(method, domains={"mnist": digits["mnist"], "usps": digits["usps"]}, authorized="mnist",
                     unauthorized=["usps"], model=source_model, config={"steps": 120, "n_train": N_TRAIN, "lr": 3e-4},
                     verbose=False)["summary"]
    assert s["acc_u_before"]["usps"] - s["acc_u_after"]["usps"] > min_drop_u
    assert s["drop_a"] < 5.0


@pytest.mark.parametrize("method", ["sa-map", "sf-map", "df-map", "ntl", "cuti"])
def test_ownership_scenario_collapses_watermarked_inputs(method, source_model, digits, pseudo_source):
    """The owner's proof: the *unprotected* model still reads the watermarked digits (the grid's
    opacity is calibrated so that it does), the protected one collapses on them, clean accuracy
    stays. SF/DF-MAP learn it from the watermarked pseudo-source: no real image."""
    from ipshield import jobs

    steps = {"sa-map": 200, "sf-map": 300, "df-map": 300, "ntl": 300, "cuti": 120}[method]
    opts = {"n_train": N_TRAIN, "steps": steps, **({"n_pseudo": 512} if method.endswith("map") else {})}
    kw = {"pseudo_source": pseudo_source[:2]} if method in ("sf-map", "df-map") else {}
    m = jobs.protect(method, domains={"mnist": digits["mnist"]}, authorized="mnist", scenario="ownership",
                     model=source_model, config=opts, options=kw, verbose=False)
    s = m["summary"]
    assert m["unauthorized"] == ["mnist+watermark"]
    assert m["watermark"]["opacity"] in (0.1, 0.2, 0.3)  # calibrated: the pure white grid breaks the source model
    assert m["watermark"]["calibration"]["accuracy_by_opacity"]["1.0"] < 40.0
    assert s["acc_u_before"]["mnist+watermark"] > 80.0  # without the protection the watermark proves nothing
    assert s["acc_u_after"]["mnist+watermark"] < LIMIT_OWNERSHIP[method] and s["drop_a"] < 4.0
    if method in ("sf-map", "df-map"):
        assert m["unauthorized_data"] == "ownership watermark on the pseudo-source"


#: measured (two threads, opacity 0.2, unprotected 91.0 %): SA / SF / DF-MAP 8.7-9.0 % (drop 1.7-2.7
#: points), CUTI 12.0 %, NTL 78.7 % (the spec's min(1, 0.1 MMD) factor keeps NTL weak on a faint
#: grid; docs/map.md, "Ownership verification")
LIMIT_OWNERSHIP = {"sa-map": 20.0, "sf-map": 20.0, "df-map": 20.0, "ntl": 86.0, "cuti": 25.0}


def test_ownership_opacity_calibration_and_config_errors(source_model, digits):
    from ipshield.errors import ConfigError
    from ipshield.protect.ntl import NTLConfig
    from ipshield.protect.restrict import calibrate_watermark_opacity, train_tensors

    x, y = train_tensors(digits["mnist"], 300, 32, 0)
    a, info = calibrate_watermark_opacity(source_model, x, y.long(), keep=0.9)
    accs = info["accuracy_by_opacity"]
    assert accs[str(a)] >= 0.9 * info["clean_accuracy"] and accs["1.0"] < accs["0.1"]
    stricter, _ = calibrate_watermark_opacity(source_model, x, y.long(), keep=0.995)
    assert stricter <= a
    with pytest.raises(ConfigError, match="the owner's own watermark"):
        NTLConfig.build({"scenario": "ownership", "target_free": True})
    with pytest.raises(ConfigError, match="watermark_opacity"):
        NTLConfig.build({"watermark_opacity": 1.5})


def test_finetune_and_shot_attacks_report_recovery(sa_run, digits):
    from ipshield.attacks.domain import finetune_attack, run_finetune, run_shot, shot_attack
    from ipshield.models.classifiers import load_classifier
    from ipshield.registry import ATTACKS

    assert ATTACKS.get("finetune").run is run_finetune and ATTACKS.get("shot").run is run_shot
    assert ATTACKS.get("finetune").target == "classifier" and ATTACKS.get("finetune").budget == "k"
    out, m = sa_run
    protected = load_classifier(out)
    ft = finetune_attack(protected, digits["usps"], k=100, steps=40)
    assert abs(ft["acc_before"] - m["summary"]["acc_u_after"]["usps"]) < 1e-6
    assert ft["acc_after"] > ft["acc_before"] + 20.0  # 100 labels break the restriction
    sh = shot_attack(protected, digits["usps"], steps=10, n_train=300)
    assert 0.0 <= sh["acc_after"] <= 100.0 and sh["attack"] == "shot"


def test_second_architecture_resnet(digits):
    from ipshield.models.classifiers import train_source
    from ipshield.protect.map import MAPConfig, run

    model = train_source("resnet_small", digits["mnist"], epochs=4, lr=5e-3)
    assert model.train_info["test_accuracy"] > 75.0
    s = run(MAPConfig(setting="sa", steps=200, n_train=N_TRAIN), model, digits["mnist"], [digits["usps"]], None)["summary"]
    # measured: authorized 85.7 -> 80.3, USPS 35.3 -> 8.3 (MAP's defaults were tuned on vgg_small)
    assert s["drop_a"] < 10.0
    assert s["acc_u_after"]["usps"] < 20.0 and s["acc_u_before"]["usps"] - s["acc_u_after"]["usps"] > 15.0


class _NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_bad_inputs_give_clear_errors(digits, source_model):
    from ipshield.models.classifiers import Classifier
    from ipshield.protect.map import MAPConfig, MaskedClassifier, run

    classes = digits["mnist"].classes
    nothing = Classifier(nn.Sequential(nn.Flatten(), nn.Identity()), classes)
    with pytest.raises(IPShieldError, match="no maskable layers"):
        run(MAPConfig(setting="sa", steps=1), nothing, digits["mnist"], [digits["usps"]], None)
    with pytest.raises(IPShieldError, match="no maskable layers"):
        MaskedClassifier(nn.ReLU())
    other = Classifier(source_model.net, [f"class{i}" for i in range(10)])
    with pytest.raises(DataError, match="source model predicts classes"):
        run(MAPConfig(setting="sa", steps=1), other, digits["mnist"], [digits["usps"]], None)
    no_bn = Classifier(_NoBN(), classes)
    for setting in ("sf", "df"):
        with pytest.raises(IPShieldError, match="needs BatchNorm layers in the source model, because"):
            run(MAPConfig(setting=setting, steps=1), no_bn, digits["mnist"], [digits["usps"]], None)
    from ipshield.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        MAPConfig.build({"setting": "sa", "stepz": 3})


def test_cli_protect_map_bad_model(tmp_path, digits_root):
    from ipshield.cli import main

    with pytest.raises(SystemExit) as e:
        main(["protect", "map", "--authorized", "mnist", "--unauthorized", "usps", "--root", str(digits_root),
              "--source-model", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert e.value.code == 2


def test_bench_smoke_writes_tables_and_resumes(tmp_path, digits_root):
    from ipshield.bench.digits import DigitsBenchConfig, run_digits_bench

    # three of the six methods (a mask, a retrained model, a target-free one: the harness's three paths);
    # every method's own training is tested above, and the registry-driven tests reach each one
    cfg = DigitsBenchConfig.smoke(methods=["sa-map", "ntl", "ntl-tf"], ownership=True)
    first = run_digits_bench(tmp_path, cfg, root=digits_root, log=lambda s: None)
    rows = first["rows"]
    assert {r["method"] for r in rows} == {"sa-map", "ntl", "ntl-tf"}
    for name in ("results.csv", "results.md", "attacks.csv", "attacks.md", "metrics.json", "ownership.csv", "ownership.md"):
        assert (tmp_path / name).is_file(), name
    own = first["ownership"]  # one row per method (ntl-tf has no ownership form) for the one source
    assert [(r["method"], r["authorized"]) for r in own] == [(m, "mnist") for m in ("sa-map", "ntl")]
    assert all(0 < r["opacity"] <= 1 and r["acc_wm_before"] > 50.0 for r in own)
    assert "watermarked, protected" in (tmp_path / "ownership.md").read_text()
    md = (tmp_path / "results.md").read_text()
    assert "ST-D" in md and "sa-map" in md
    attacks = (tmp_path / "attacks.csv").read_text()
    assert "finetune_k10" in attacks and "source (unprotected)" in attacks
    assert all(r["seed"] == 0 for r in rows)
    sa = next(r for r in rows if r["method"] == "sa-map")
    assert sa["acc_u_after"] < sa["acc_u_before"]
    second = run_digits_bench(tmp_path, cfg, root=digits_root, log=lambda s: None)
    assert second["computed"] == []  # every cell reused
    assert second["rows"] == rows
