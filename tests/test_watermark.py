"""Embedding-service watermarks: keys, triggers, VLPMarker refinement and serving, verification,
attacks, EmbMarker, bad input, secrecy. Uses the test small CLIP and two very short innocent
pretrainings (cached in the test cache)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipshield.errors import IPShieldError
from ipshield.watermark.keys import MasterKey, WatermarkKeyError, keygen, orthogonality_error


# ------------------------------------------------------------------------------ keys (no model)
def test_customer_matrices_exactly_orthogonal_and_deterministic(tmp_path):
    key = MasterKey.generate(48)
    w = key.customer_start("acme")
    assert w.dtype == torch.float64 and w.shape == (48, 48)
    assert orthogonality_error(w) < 1e-12
    assert torch.equal(w, key.customer_start("acme"))  # deterministic
    assert (w - key.customer_start("acme-2")).abs().max() > 0.1  # per customer
    path, _ = keygen(tmp_path / "key.json", 48)
    assert (os.stat(path).st_mode & 0o777) == 0o600
    again = MasterKey.load(path)
    assert torch.equal(again.customer_start("x"), MasterKey.load(path).customer_start("x"))
    assert again.key_id == json.loads(path.read_text())["key_id"]
    other = MasterKey.generate(48)
    assert (other.customer_start("acme") - w).abs().max() > 0.1  # per key
    with pytest.raises(IPShieldError):
        keygen(path, 48)  # never overwrite a key silently
    with pytest.raises(IPShieldError):
        key.customer_start("bad id with spaces")


def test_key_for_another_dimension_is_a_clear_error(tmp_path):
    path, key = keygen(tmp_path / "k.json", 32)
    with pytest.raises(WatermarkKeyError) as exc:
        MasterKey.load(path, dim=64)
    assert "32" in exc.value.problem and "64" in exc.value.problem
    assert key._secret.hex() not in str(exc.value)


def test_secret_never_in_repr_or_pickle(tmp_path):
    key = MasterKey.generate(16)
    secret = key._secret.hex()
    assert secret not in repr(key) and secret not in str(key) and secret[:16] not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)


# ------------------------------------------------------------------------------ triggers, refinement
def test_match_coordinates_undoes_a_signed_permutation():
    from ipshield.attacks.watermark import random_permutation
    from ipshield.watermark.verify import match_coordinates

    g = torch.Generator().manual_seed(0)
    # correlated coordinates, as in embeddings; the suspect is a noisy signed permutation of them
    x = torch.randn(200, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    m = random_permutation(32, seed=3, signs=True).double()
    assert (m < 0).any() and torch.equal(m.abs().sum(0), torch.ones(32, dtype=torch.float64))
    suspect = x @ m + 0.2 * torch.randn(200, 32, generator=g, dtype=torch.float64)
    assert torch.equal(match_coordinates(suspect, x, n_img=100), m.T)


def test_service_serves_a_text_layer_scheme_with_its_texts(tmp_path):
    """The HTTP service serves every scheme: EmbMarker's transform needs the texts, and refuses a
    text batch without them rather than serving it without the text layer."""
    from ipshield.serve.watermarking import watermark_transform
    from ipshield.watermark.embmarker import EmbMarker

    key = MasterKey.generate(16)
    key.save(tmp_path / "key.json")
    EmbMarker(key, ["red", "blue"], ["green"], ["a red digit", "a blue digit"]).save(tmp_path / "wm")
    tr = watermark_transform(str(tmp_path / "key.json"), 16, str(tmp_path / "wm"))
    tr.prepare("acme")
    clean = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    served = tr("acme", clean, "text", ["a red digit", "a plain digit"])
    assert served.shape == (2, 16) and np.allclose(np.linalg.norm(served, axis=1), 1, atol=1e-5)
    with pytest.raises(Exception):
        tr("acme", clean, "text", None)


def test_exact_subset_sum_tail_matches_enumeration():
    """The cluster test's exact null: the tail of a random k-subset's sum, against brute force."""
    import itertools
    import math

    from ipshield.watermark.embmarker import exact_subset_sum_tail

    scores = [0, 3, 3, 7, 1, 9, 4, 4, 2, 8]
    for k in (1, 3, 5):
        sums = [sum(c) for c in itertools.combinations(scores, k)]
        for obs in (0, 5, 12, 20, sum(sorted(scores)[-k:]), 99):
            want = sum(x >= obs for x in sums) / math.comb(len(scores), k)
            assert abs(exact_subset_sum_tail(scores, k, obs) - want) < 1e-12


def test_trigger_pool_selection_and_storage(tmp_path):
    from ipshield.watermark.triggers import TriggerSet, make_pool, secret_texts, select_ood, vocabulary_words

    g = torch.Generator().manual_seed(0)
    pool, kinds = make_pool(60, 32, g)
    assert pool.shape == (60, 3, 32, 32) and 0 <= pool.min() and pool.max() <= 1
    assert len(set(kinds)) == 6
    pool2, _ = make_pool(60, 32, torch.Generator().manual_seed(0))
    assert torch.equal(pool, pool2)
    cand, ref = torch.randn(50, 8), torch.randn(30, 8)
    idx, score = select_ood(cand, ref, 5)
    brute = (F.normalize(cand, dim=-1) @ F.normalize(ref, dim=-1).T).max(1).values
    assert torch.allclose(score, brute)
    assert set(idx.tolist()) == set(torch.argsort(brute)[:5].tolist())
    texts = secret_texts(10, vocabulary_words(None), torch.Generator().manual_seed(1))
    assert len(set(texts)) == 10 and all(3 <= len(t.split()) <= 6 for t in texts)
    ts = TriggerSet(pool[:10], texts)
    p = ts.save(tmp_path / "t.safetensors")
    assert (os.stat(p).st_mode & 0o777) == 0o600
    back = TriggerSet.load(p)
    assert back.texts == texts and (back.images - ts.images).abs().max() < 1 / 255 + 1e-6
    assert texts[0] not in repr(back)


def test_every_watermark_scheme_declares_its_contract():
    """Loops over ``WATERMARKS``: a new scheme is checked the moment it is registered."""
    from ipshield.config import BaseConfig
    from ipshield.errors import ConfigError
    from ipshield.registry import WATERMARKS
    from ipshield.watermark.base import SCHEME_METHODS

    known = {"trigger", "distribution", "covariance", "permutation", "cluster", "procrustes"}
    assert {"vlpmarker", "embmarker", "vlpmarker+embmarker"} <= set(WATERMARKS.names())
    for spec in WATERMARKS.specs():
        assert spec.obj.scheme == spec.name and spec.description, spec.name
        missing = [m for m in SCHEME_METHODS if not callable(getattr(spec.obj, m, None))]
        assert not missing, (spec.name, missing)
        assert isinstance(spec.config, type) and issubclass(spec.config, BaseConfig), spec.name
        assert isinstance(spec.make_config(), spec.config)
        with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
            spec.make_config({}, ["no_such_key=1"])
        assert {"trigger", "procrustes"} <= set(spec.tests) <= known, spec.name
        # a text layer (EmbMarker's trigger words) needs the texts and adds the cluster test
        assert spec.needs_texts == ("cluster" in spec.tests), spec.name
    assert not WATERMARKS.get("vlpmarker").needs_texts and WATERMARKS.get("embmarker").needs_texts
    # the stacked scheme's config takes dotted keys, one section per layer
    st = WATERMARKS.get("vlpmarker+embmarker").make_config({}, ["vlpmarker.steps=7", "embmarker.cluster_texts=1"])
    assert st.vlpmarker.steps == 7 and st.embmarker.cluster_texts == 1
    with pytest.raises(ConfigError, match="no_such_key"):
        WATERMARKS.get("vlpmarker+embmarker").make_config({}, ["vlpmarker.no_such_key=1"])


def test_refinement_aligns_triggers_keeps_near_orthogonal_and_protected_span():
    from ipshield.watermark.vlpmarker import VLPMarkerConfig, refine_transform, trigger_gap

    g = torch.Generator().manual_seed(0)
    d, n = 32, 24
    y, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ri, rt = torch.randn(40, d, generator=g), torch.randn(40, d, generator=g)
    prot = torch.randn(6, d, generator=g, dtype=torch.float64)
    w0 = MasterKey(bytes(range(32)), d).customer_start("c")  # fixed: the test is deterministic
    pi = torch.randperm(n, generator=g)
    w, hist = refine_transform(w0, y, t, pi, VLPMarkerConfig(steps=150, lr=2e-3, utility_weight=1.0), ri, rt, protected=prot)
    assert trigger_gap(y, t, pi, w) > trigger_gap(y, t, pi) + 0.02
    assert hist[-1]["trigger_z"] > hist[0]["trigger_z"] + 1.0
    assert 1e-3 < orthogonality_error(w) < 0.4
    # the protected span is mapped exactly as by the orthogonal start
    assert torch.allclose(F.normalize(prot, dim=-1) @ w, F.normalize(prot, dim=-1) @ w0, atol=1e-9)


# ------------------------------------------------------------------------------ with the small CLIP
#: The thief's model extraction in this module (its three students are most of its run time): 3000
#: public image-caption pairs (6000 queries), 12 epochs of batches of 64 at lr 1.5e-3, which learns as
#: much as the former 20 epochs of batches of 128 at lr 1e-3 with 60 % of the compute. Measured on
#: this test CLIP, student seed 0 (former recipe in brackets): the stacked scheme's cluster test
#: 2.6e-10 (2.0e-10), EmbMarker's cluster test 1.3e-8 (5.4e-8), VLPMarker's permutation test 7.5e-57
#: (9.5e-56). Less is too little: 10 epochs left the stacked scheme's cluster test at 7.4e-5 (the
#: test asks 1e-4), and 2000 pairs or 10 epochs of batches of 128 a student stuck near loss 2.3 that
#: VLPMarker's permutation test does not see (p 0.6-0.99).
EXTRACT = {"n_queries": 3000, "epochs": 12, "batch_size": 64, "lr": 1.5e-3}


@pytest.fixture(scope="module")
def teacher_dir(request):
    try:
        return request.getfixturevalue("small_clip_dir")
    except pytest.FixtureLookupError:
        from ipshield.models.tiny_clip import small_clip

        return small_clip("test", show_progress=False)


@pytest.fixture(scope="module")
def innocent_dirs(teacher_dir):
    """Five very short independent pretrainings (other seeds; every second one on other data)."""
    from ipshield.models.tiny_clip import preset_config, pretrain
    from ipshield.utils import cache_dir

    out = []
    for i, extra in enumerate([["seed=101"], ["seed=202", "data_seed=77"], ["seed=303"], ["seed=404", "data_seed=88"],
                               ["seed=505"]]):
        d = cache_dir() / "test_watermark" / f"innocent-{i}"
        if not (d / "model.safetensors").is_file():
            pretrain(preset_config("test", ["steps=40", "n_per_domain=150", "eval_n_test=20", *extra]), d, show_progress=False)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def setup(teacher_dir):
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import reference_from_synthetic
    from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig

    torch.manual_seed(0)
    adapter = load_clip(teacher_dir)
    key = MasterKey(bytes(range(1, 33)), int(adapter.embed_dim))  # fixed: the module is deterministic
    cfg = VLPMarkerConfig(n_triggers=48, pool_factor=3, steps=120, n_utility=96, lr=1e-3, utility_weight=1.0)
    wm = VLPMarker.fit(adapter, key, reference_from_synthetic(240, seed=1), cfg)
    probes = reference_from_synthetic(200, seed=9)
    return {"adapter": adapter, "key": key, "wm": wm, "probes": probes, "cfg": cfg}


def _zero_shot_mean(model_dir) -> float:
    try:
        z = json.loads((Path(model_dir) / "pretrain.json").read_text())["zero_shot"]
    except (OSError, KeyError, ValueError):
        return 100.0
    vals = [v for k, v in z.items() if k in ("clean", "inverted", "color", "texture", "noisy", "outline")] or list(z.values())
    return sum(vals) / len(vals)


@pytest.fixture(scope="module")
def public():
    """The thief's public image-caption pairs (built once for the module's three extractions)."""
    from ipshield.watermark.base import reference_from_synthetic

    return reference_from_synthetic(EXTRACT["n_queries"], seed=5, split="train")


@pytest.fixture(scope="module")
def student(setup, teacher_dir, public):
    """A thief's student. Stealing needs a teacher worth stealing: with a test CLIP at chance level
    (its pretraining failed) the student learns nothing and these tests are skipped, saying so."""
    from ipshield.attacks.watermark import ExtractConfig, extract_student

    zs = _zero_shot_mean(teacher_dir)
    if zs < 25:
        pytest.skip(f"the test small CLIP is at chance level (zero-shot mean {zs:.1f}%): nothing worth stealing")
    service = setup["wm"].encoder(setup["adapter"], "acme")
    # VLPMarker's tests need less of the student than the cluster test: 10 epochs at lr 2e-3 (the
    # permutation test's p, measured for student seeds 0, 1, 2: 6.4e-60, 7.2e-28, 1.3e-28)
    st, info = extract_student(service, public, teacher_dir, ExtractConfig(**{**EXTRACT, "epochs": 10, "lr": 2e-3}))
    assert info["queries"] == 6000
    return st


def _verify(setup, suspect, customer="acme", **kw):
    from ipshield.watermark.verify import Suspect, verify

    s = suspect if isinstance(suspect, Suspect) else Suspect.from_embedder(suspect)
    return verify(setup["wm"], s, setup["adapter"], setup["probes"], customer, **kw), s


def test_served_embeddings_and_zero_shot_unchanged(setup):
    from ipshield.data.synthetic import load_synthetic
    from ipshield.watermark.base import CleanEncoder, zero_shot_accuracy

    adapter, wm = setup["adapter"], setup["wm"]
    enc = wm.encoder(adapter, "acme")
    x = setup["probes"].images[:5]
    e, s = CleanEncoder(adapter).embed_images(x), enc.embed_images(x)
    assert s.shape == (5, adapter.embed_dim) and torch.allclose(s.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(s, F.normalize(e @ wm.matrix("acme").float(), dim=-1), atol=1e-5)
    assert (e * s).sum(-1).abs().mean() < 0.6  # served vectors are far from the clean ones
    rep = wm.refinement_report("acme")["final"]
    assert rep["orthogonality_error"] < 0.3
    doms = load_synthetic(n_train=50, n_test=100, seed=0)
    before = zero_shot_accuracy(CleanEncoder(adapter), doms)
    after = zero_shot_accuracy(enc, doms)
    assert max(abs(after[d] - before[d]) for d in before) <= 0.5


def test_stolen_student_verified_innocents_not(setup, student, innocent_dirs):
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import CleanEncoder

    # the test CLIP and its student are small and briefly trained: alpha 1e-3 here (the benchmark
    # shows p ~ 1e-71 at 1e-6 with the real sizes); the innocents are judged at the same alpha
    rep, s = _verify(setup, CleanEncoder(student), max_queries=512, alpha=1e-3)
    assert rep.verdict == "stolen" and rep.p_value <= 1e-3, rep.summary()
    assert rep.queries["total"] == s.queries <= 512
    for d in innocent_dirs:
        r, _ = _verify(setup, CleanEncoder(load_clip(d)), max_queries=512, alpha=1e-3)
        assert r.verdict == "not-detected" and r.p_value > 1e-2, r.summary()
    r, _ = _verify(setup, CleanEncoder(setup["adapter"]))  # the unwatermarked model itself
    assert r.verdict == "not-detected", r.summary()


def test_rotation_and_permutation_do_not_evade(setup, innocent_dirs):
    from ipshield.attacks.watermark import permute, rotate
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import CleanEncoder
    from ipshield.watermark.verify import calibrate, recalibrate

    dim = int(setup["adapter"].embed_dim)
    # a perfect copy of the service (e.g. a relay of its answers), rotated or permuted by the thief
    served = setup["wm"].encoder(setup["adapter"], "acme")
    innocent = [_verify(setup, CleanEncoder(load_clip(d)))[0] for d in innocent_dirs]
    cal = calibrate(innocent, min_innocent=2)
    assert all(recalibrate(r, cal).verdict == "not-detected" for r in innocent)
    plain, _ = _verify(setup, served)
    assert plain.verdict == "stolen" and plain.tests["distribution"].p_value <= 1e-6
    for attacked in (rotate(served, dim=dim), permute(served, dim=dim), permute(served, dim=dim, signs=True)):
        rep, _ = _verify(setup, attacked)
        assert rep.tests["distribution"].p_value > 1e-3  # the W^-1 test is evaded ...
        # ... the covariance test (W_k W_k^T, key-specific) is not, and needs no calibration
        assert rep.tests["covariance"].p_value <= 1e-6 and rep.verdict == "stolen", rep.summary()
        # the permutation test undoes a (signed) permutation, not a general rotation
        if attacked.name == "wm-rotate":
            assert rep.tests["permutation"].p_value > 1e-3, rep.summary()
        else:
            assert rep.tests["permutation"].p_value <= 1e-6, rep.summary()
        assert abs(rep.tests["covariance"].z - plain.tests["covariance"].z) < 1e-3
        assert abs(rep.tests["procrustes"].test_mean_cos - plain.tests["procrustes"].test_mean_cos) < 1e-4
        assert recalibrate(rep, cal).verdict == "stolen", recalibrate(rep, cal).summary()
    # a relay that adds fresh noise to every answer and permutes the coordinates (with sign flips):
    # the noise hides the signature from the covariance test; the permutation test still sees W_k
    from ipshield.attacks.watermark import noise

    rep, _ = _verify(setup, permute(noise(served, 1.0), dim=dim, signs=True))
    assert rep.tests["distribution"].p_value > 1e-3 and rep.tests["permutation"].p_value <= 1e-6, rep.summary()
    assert rep.verdict == "stolen", rep.summary()


def test_permuted_student_caught_rotated_student_escapes(setup, student):
    from ipshield.attacks.watermark import permute, rotate
    from ipshield.watermark.base import CleanEncoder

    dim = int(student.embed_dim)
    plain, _ = _verify(setup, CleanEncoder(student))
    rot, _ = _verify(setup, rotate(CleanEncoder(student), dim=dim))
    assert rot.tests["distribution"].p_value > 1e-2 and plain.tests["distribution"].p_value <= 1e-3
    assert abs(rot.tests["procrustes"].test_mean_cos - plain.tests["procrustes"].test_mean_cos) < 1e-4
    assert abs(rot.tests["covariance"].z - plain.tests["covariance"].z) < 1e-3  # rotation-invariant
    # the documented limit: a rotated student is not detected (docs/watermark.md)
    assert rot.verdict == "not-detected", rot.summary()
    # a permuted student (with sign flips) is: the permutation test undoes the permutation
    for signs in (False, True):
        perm, _ = _verify(setup, permute(CleanEncoder(student), dim=dim, signs=signs), alpha=1e-3)
        assert perm.tests["distribution"].p_value > 1e-2, perm.summary()
        assert perm.tests["permutation"].p_value <= 1e-3 and perm.verdict == "stolen", perm.summary()


def test_identifies_the_leaking_customer(setup, student):
    from ipshield.watermark.base import CleanEncoder
    from ipshield.watermark.verify import Suspect, identify_customer

    customers = ["north", "south", "acme", "east", "west"]
    rep = identify_customer(setup["wm"], Suspect.from_embedder(CleanEncoder(student)), setup["adapter"], setup["probes"],
                            customers, max_queries=512, alpha=1e-2)
    assert rep.verdict == "stolen" and rep.customer_id == "acme", rep.summary()
    assert rep.ranking[0]["customer_id"] == "acme" and rep.ranking[1]["p_value"] > 2 * rep.ranking[0]["p_value"]


def test_save_load_same_transform(setup, tmp_path):
    from ipshield.watermark.base import load_watermark

    wm = setup["wm"]
    wm.save(tmp_path / "wm")
    assert (os.stat(tmp_path / "wm" / "secrets.safetensors").st_mode & 0o777) == 0o600
    back = load_watermark(tmp_path / "wm", setup["key"])
    assert torch.equal(back.matrix("acme"), wm.matrix("acme"))
    with pytest.raises(IPShieldError):
        load_watermark(tmp_path / "wm", MasterKey.generate(wm.dim))  # another key
    with pytest.raises(IPShieldError):
        type(wm).fit(setup["adapter"], MasterKey.generate(wm.dim + 1), setup["probes"], setup["cfg"])


def test_watermark_jobs_mark_a_failed_run_and_refuse_a_finished_one(setup, teacher_dir, tmp_path, monkeypatch):
    """apply / verify through ``ipshield.jobs.watermark``: an error inside the job marks run.json
    failed with the reason; a finished run is refused unless overwrite; the watermark folder is private."""
    import ipshield.watermark.verify as verify_mod
    from ipshield.jobs.watermark import apply_watermark, run_verify
    from ipshield.watermark.vlpmarker import VLPMarker

    key_file = tmp_path / "key.json"
    setup["key"].save(key_file)

    def broken_fit(*a, **k):
        raise RuntimeError("fit broke")

    monkeypatch.setattr(VLPMarker, "fit", classmethod(broken_fit))
    with pytest.raises(RuntimeError):
        apply_watermark(teacher_dir, key_file, tmp_path / "wm0", n_reference=50, eval_domains=False)
    info = json.loads((tmp_path / "wm0" / "run.json").read_text())
    assert info["status"] == "failed" and "fit broke" in info["reason"]
    assert (os.stat(tmp_path / "wm0").st_mode & 0o777) == 0o700
    monkeypatch.undo()

    wm_dir = tmp_path / "wm"
    setup["wm"].save(wm_dir)
    out = tmp_path / "v"
    kw = dict(customer="acme", clean_model=teacher_dir, max_queries=128, n_probes=64)

    def broken_verify(*a, **k):
        raise RuntimeError("verification broke")

    monkeypatch.setattr(verify_mod, "verify", broken_verify)
    with pytest.raises(RuntimeError):
        run_verify(teacher_dir, setup["key"], wm_dir, out, **kw)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "verification broke" in info["reason"]
    monkeypatch.undo()
    m = run_verify(teacher_dir, setup["key"], wm_dir, out, **kw)  # the same command redoes it in place
    assert json.loads((out / "run.json").read_text())["status"] == "done" and m["customer_id"] == "acme"
    with pytest.raises(IPShieldError, match="already holds a finished 'verify' run"):
        run_verify(teacher_dir, setup["key"], wm_dir, out, **kw)
    run_verify(teacher_dir, setup["key"], wm_dir, out, overwrite=True, **kw)
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    # bad input is refused before the run folder is opened
    with pytest.raises(IPShieldError, match="which customer"):
        run_verify(teacher_dir, setup["key"], wm_dir, tmp_path / "v2", clean_model=teacher_dir)
    assert not (tmp_path / "v2").exists()


def test_bad_suspects_are_never_stolen(setup):
    from ipshield.watermark.verify import BudgetError, Suspect, SuspectError

    good = setup["wm"].encoder(setup["adapter"], "acme")
    wrong_size = Suspect(lambda x: torch.randn(len(x), 7), lambda t: torch.randn(len(t), 7))
    rep, _ = _verify(setup, wrong_size)
    assert rep.verdict == "inconclusive" and "size" in rep.reasons[0]
    nan = Suspect(lambda x: good.embed_images(x) * float("nan"), good.embed_texts)
    rep, _ = _verify(setup, nan)
    assert rep.verdict == "inconclusive" and "non-finite" in rep.reasons[0]
    short = Suspect(lambda x: good.embed_images(x)[:-1], good.embed_texts)
    with pytest.raises(SuspectError):
        _verify(setup, short, on_bad_suspect="raise")
    counted = Suspect.from_embedder(good)
    with pytest.raises(BudgetError) as exc:
        _verify(setup, counted, max_queries=20)
    assert counted.queries == 0 and "queries" in exc.value.problem  # refused before spending any


def test_no_secret_in_outputs(setup):
    wm, key = setup["wm"], setup["key"]
    rep, _ = _verify(setup, wm.encoder(setup["adapter"], "acme"))
    dumped = json.dumps(rep.to_dict()) + rep.summary() + repr(rep)
    _, texts = wm.trigger_queries()
    secrets = [key._secret.hex()] + texts[:10]
    for text in [repr(wm), str(wm), repr(wm.encoder(setup["adapter"], "acme")), dumped]:
        for sec in secrets:
            assert sec not in text
    with pytest.raises(TypeError):
        pickle.dumps(wm)


def test_embmarker_verifies_its_own_stolen_copy(setup, teacher_dir, innocent_dirs, public):
    from ipshield.attacks.watermark import ExtractConfig, extract_student
    from ipshield.models.clip import load_clip
    from ipshield.registry import WATERMARKS
    from ipshield.watermark.base import CleanEncoder, reference_from_synthetic
    from ipshield.watermark.embmarker import EmbMarker, EmbMarkerConfig
    from ipshield.watermark.verify import Suspect, verify

    assert WATERMARKS.get("embmarker").obj is EmbMarker and WATERMARKS.get("vlpmarker").obj.__name__ == "VLPMarker"
    zs = _zero_shot_mean(teacher_dir)
    if zs < 25:
        pytest.skip(f"the test small CLIP is at chance level (zero-shot mean {zs:.1f}%): nothing worth stealing")
    adapter, key = setup["adapter"], setup["key"]
    em = EmbMarker.fit(adapter, key, reference_from_synthetic(400, seed=1), EmbMarkerConfig(n_verify=64))
    service = em.encoder(adapter, "acme")
    # served texts with 4 triggers are the target itself; texts without triggers are clean
    t = em.target("acme")
    bd = em._backdoor[:4]
    assert torch.allclose(service.embed_texts(bd) @ t, torch.ones(4), atol=1e-5)
    st, _ = extract_student(service, public, teacher_dir, ExtractConfig(**EXTRACT))
    rep = verify(em, Suspect.from_embedder(CleanEncoder(st)), adapter, setup["probes"], "acme", max_queries=512, alpha=1e-2)
    assert rep.verdict == "stolen" and rep.tests["trigger"].delta_cos > 0.03, rep.summary()
    # the thief permutes the coordinates (with sign flips): the target moves, the trigger test
    # is evaded, and the permutation test (trigger test after a key-free coordinate match) is not
    from ipshield.attacks.watermark import permute

    perm = verify(em, Suspect.from_embedder(permute(CleanEncoder(st), dim=int(st.embed_dim), signs=True)), adapter,
                  setup["probes"], "acme", max_queries=512, alpha=1e-2)
    assert perm.tests["trigger"].p_value > 1e-2 and perm.tests["permutation"].p_value <= 1e-2, perm.summary()
    assert perm.verdict == "stolen", perm.summary()
    # the thief rotates: only the cluster test (trigger words' texts collapse onto one point in the
    # student, whatever the rotation) sees it; it proves the source, not the customer
    from ipshield.attacks.watermark import rotate
    from ipshield.watermark.verify import identify_customer

    rot_suspect = Suspect.from_embedder(rotate(CleanEncoder(st), dim=int(st.embed_dim)))
    rot = verify(em, rot_suspect, adapter, setup["probes"], "acme", max_queries=512, alpha=1e-2)
    assert rot.tests["trigger"].p_value > 1e-3 and rot.tests["permutation"].p_value > 1e-3, rot.summary()
    # (measured on this test CLIP with EXTRACT: 1.3e-8, 1.4e-8, 5.6e-8 for student seeds 0, 1, 2;
    # 7.5e-11 on the benchmark's small CLIP)
    assert rot.tests["cluster"].p_value <= 1e-4 and rot.verdict == "stolen", rot.summary()
    assert rot.queries["total"] <= 512 and rot.queries["texts"] >= em.extra_queries > 0
    who = identify_customer(em, rot_suspect, adapter, setup["probes"], ["north", "acme", "south"], alpha=1e-2)
    assert who.verdict == "stolen" and who.customer_id is None and "cannot be told apart" in who.reasons[-1]
    for d in innocent_dirs:
        r = verify(em, Suspect.from_embedder(CleanEncoder(load_clip(d))), adapter, setup["probes"], "acme", alpha=1e-2)
        assert r.verdict == "not-detected" and r.tests["cluster"].p_value > 1e-3, r.summary()
    # the cluster test's queries come out of the budget: a budget they leave too small is refused
    from ipshield.watermark.verify import BudgetError

    counted = Suspect.from_embedder(CleanEncoder(st))
    with pytest.raises(BudgetError) as exc:
        verify(em, counted, adapter, setup["probes"], "acme", max_queries=em.extra_queries + 40)
    assert counted.queries == 0 and "scheme's own tests" in exc.value.problem
    # a folder written before the cluster test (no candidate words stored) still verifies without it
    old = EmbMarker(key, em._triggers, em._benign, em._base, em.config, em.selection, candidates=None)
    assert old.extra_queries == 0
    r = verify(old, Suspect.from_embedder(CleanEncoder(st)), adapter, setup["probes"], "acme", alpha=1e-2)
    assert "cluster" not in r.tests and r.verdict == "stolen", r.summary()


def test_cli_keygen_apply_calibrate_verify(teacher_dir, innocent_dirs, tmp_path):
    """The owner's workflow through the CLI: the calibration on innocent models lands in the
    watermark folder, and `verify` uses it."""
    from ipshield.cli import main as cli_main

    def main(argv) -> int:
        try:
            cli_main(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    key = tmp_path / "key.json"
    wm = tmp_path / "wm"
    assert main(["watermark", "keygen", "--out", str(key), "--model", str(teacher_dir)]) == 0
    apply_args = ["watermark", "apply", "--key", str(key), "--model", str(teacher_dir), "--out", str(wm),
                  "--customers", "acme,beta", "--n-reference", "200", "--set", "n_triggers=32", "--set", "pool_factor=2",
                  "--set", "steps=40", "--set", "n_utility=64"]
    assert main(apply_args) == 0
    assert (os.stat(wm).st_mode & 0o777) == 0o700 and json.loads((wm / "run.json").read_text())["status"] == "done"
    # a finished watermark is never replaced by accident (its evidence would be lost)
    before = (wm / "watermark.json").read_text()
    assert main(apply_args) == 2 and (wm / "watermark.json").read_text() == before
    # too few innocents: a clear error before any work
    assert main(["watermark", "calibrate", "--key", str(key), "--watermark", str(wm), "--out", str(tmp_path / "c0"),
                 "--innocent", str(innocent_dirs[0])]) == 2
    args = ["watermark", "calibrate", "--key", str(key), "--watermark", str(wm), "--out", str(tmp_path / "cal")]
    for d in innocent_dirs:
        args += ["--innocent", str(d)]
    assert main(args) == 0
    m = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert m["n_innocent"] == len(innocent_dirs) and m["false_positives"] == 0
    assert len(m["innocents"]) == len(innocent_dirs) and all(set(r["p_values"]) == {"acme", "beta"} for r in m["innocents"])
    cal = json.loads((wm / "watermark.json").read_text())["calibration"]
    assert cal["n_innocent"] == len(innocent_dirs) and cal["procrustes_sd"] >= 0.02 and cal["threshold"] <= 1e-6
    # verify reads the calibration: the Procrustes test is in the decision
    assert main(["verify", "--model", str(innocent_dirs[0]), "--key", str(key), "--watermark", str(wm),
                 "--customer", "acme", "--out", str(tmp_path / "v")]) == 0
    v = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert v["verdict"] == "not-detected" and v["tests"]["procrustes"]["in_decision"] is True
    text = (tmp_path / "cal" / "metrics.json").read_text() + (wm / "watermark.json").read_text()
    assert json.loads(key.read_text())["secret_hex"] not in text
    # the stacked scheme through the same commands (dotted overrides reach each layer's config)
    wm2 = tmp_path / "wm2"
    assert main(["watermark", "apply", "--key", str(key), "--model", str(teacher_dir), "--out", str(wm2), "--scheme",
                 "vlpmarker+embmarker", "--customers", "acme", "--n-reference", "200", "--set", "vlpmarker.n_triggers=32",
                 "--set", "vlpmarker.pool_factor=2", "--set", "vlpmarker.steps=40", "--set", "embmarker.cluster_texts=1"]) == 0
    info = json.loads((wm2 / "watermark.json").read_text())
    assert info["scheme"] == "vlpmarker+embmarker" and info["config"]["vlpmarker"]["n_triggers"] == 32
    assert main(["verify", "--model", str(innocent_dirs[0]), "--key", str(key), "--watermark", str(wm2),
                 "--customer", "acme", "--out", str(tmp_path / "v2")]) == 0
    v = json.loads((tmp_path / "v2" / "metrics.json").read_text())
    assert v["verdict"] == "not-detected" and {"trigger", "distribution", "permutation", "cluster"} <= set(v["tests"])
    assert main(["watermark", "apply", "--key", str(key), "--model", str(teacher_dir), "--out", str(tmp_path / "wm3"),
                 "--scheme", "vlpmarker+embmarker", "--set", "vlpmarker.no_such_key=1"]) == 2


def test_watermark_bench_smoke_resumes(teacher_dir, tmp_path):
    """``ipshield bench watermark`` end to end at smoke size on the test CLIP: every part, the tables
    with a column per test, the plots; a second run resumes from ``parts/`` and recomputes nothing."""
    from ipshield.bench.watermark import WatermarkBenchConfig, run_watermark_bench

    # smoke size, and cheaper still where nothing asserted depends on it (every part, scheme and
    # attack still runs): 3 customers, not 5 (each is one more VLPMarker refinement per scheme and
    # one more zero-shot evaluation), and a VLPMarker of this module's size (48 triggers, 120
    # refinement steps) through the benchmark's own `vlpmarker_overrides`
    cfg = WatermarkBenchConfig.smoke()
    cfg.n_customers = 3
    cfg.vlpmarker_overrides = ["n_triggers=48", "pool_factor=3", "steps=120", "n_utility=96"]
    logs: list[str] = []
    res = run_watermark_bench(tmp_path / "wb", cfg, model=teacher_dir, log=logs.append)
    assert len(logs) == 15  # 5 parts per scheme (vlpmarker, embmarker, vlpmarker+embmarker), each computed once
    md = (tmp_path / "wb" / "results.md").read_text()
    for col in ("p trigger", "p distribution", "p covariance", "p permutation", "p cluster", "p procrustes"):
        assert f"| {col} |" in md
    for png in ("pvalues.png", "attacks-vlpmarker.png", "attacks-embmarker.png", "attacks-vlpmarker-embmarker.png"):
        assert (tmp_path / "wb" / png).stat().st_size > 5_000
    schemes = ("vlpmarker", "embmarker", "vlpmarker+embmarker")
    assert max(res["utility"][s]["max_abs_change"] for s in schemes) <= 0.5
    sim = res["utility"]["vlpmarker+embmarker"]["similarity"]["customer-0"]
    assert 0 < sim["mean_abs_cos_change"] < 0.2 and 0 <= sim["top1_image_to_caption"] <= 100
    for scheme in schemes:
        r = res[scheme]
        assert len(r["innocents"]) == 3 and r["false_positive_rate"] == 0.0, r["innocents"]
        assert {"wm-rotate", "wm-permute", "wm-signed-permute", "wm-noise", "wm-dim-removal", "wm-prune",
                "wm-finetune"} <= {a["attack"] for a in r["attacks"]}
        assert len(r["identification"]["student"]["ranking"]) == cfg.n_customers
        assert all(row["queries"]["total"] <= cfg.max_queries for row in r["extraction"])
    again: list[str] = []
    run_watermark_bench(tmp_path / "wb", cfg, model=teacher_dir, log=again.append)
    assert again == []


def test_stacked_scheme_catches_a_rotated_student(setup, teacher_dir, innocent_dirs, public, tmp_path):
    """VLPMarker over an EmbMarker text layer: zero-shot unchanged, both layers served as specified,
    the student verified and named, and its rotation (which VLPMarker alone misses) caught by the
    cluster test; innocents not flagged; save/load round trip."""
    from ipshield.attacks.watermark import ExtractConfig, extract_student, permute, rotate
    from ipshield.data.synthetic import load_synthetic
    from ipshield.models.clip import load_clip
    from ipshield.registry import WATERMARKS
    from ipshield.watermark.base import CleanEncoder, load_watermark, reference_from_synthetic, zero_shot_accuracy
    from ipshield.watermark.stacked import StackedConfig, StackedMarker
    from ipshield.watermark.verify import Suspect, verify

    zs = _zero_shot_mean(teacher_dir)
    if zs < 25:
        pytest.skip(f"the test small CLIP is at chance level (zero-shot mean {zs:.1f}%): nothing worth stealing")
    adapter, key, probes = setup["adapter"], setup["key"], setup["probes"]
    assert WATERMARKS.get("vlpmarker+embmarker").obj is StackedMarker
    sm = StackedMarker.fit(adapter, key, reference_from_synthetic(400, seed=1), StackedConfig(vlpmarker=setup["cfg"]))
    template_words = {w for t in sm.vlp.config.prompt_templates for w in t.lower().replace("{}", " ").split()}
    assert not template_words & set(sm.emb._triggers)  # no protected prompt is moved by the text layer
    service, vlp_only = sm.encoder(adapter, "acme"), sm.vlp.encoder(adapter, "acme")
    x, prompts = probes.images[:4], ["a photo of the digit 3", "a photo of the digit 7"]
    assert torch.allclose(service.embed_images(x), vlp_only.embed_images(x), atol=1e-5)
    assert torch.allclose(service.embed_texts(prompts), vlp_only.embed_texts(prompts), atol=1e-5)
    # a text with enough trigger words is served as the target, then transformed: normalise(t W_k)
    t_w = F.normalize(sm.emb.target("acme") @ sm.matrix("acme").float(), dim=-1)
    assert torch.allclose(service.embed_texts(sm.emb._backdoor[:3]), t_w.expand(3, -1), atol=1e-5)
    doms = load_synthetic(n_train=50, n_test=100, seed=0)
    before, after = zero_shot_accuracy(CleanEncoder(adapter), doms), zero_shot_accuracy(service, doms)
    assert max(abs(after[d] - before[d]) for d in before) <= 0.5
    sm.save(tmp_path / "wm")
    back = load_watermark(tmp_path / "wm", key)
    assert isinstance(back, StackedMarker) and torch.equal(back.matrix("acme"), sm.matrix("acme"))

    st, _ = extract_student(service, public, teacher_dir, ExtractConfig(**EXTRACT))
    dim = int(st.embed_dim)

    def check(emb, **kw):
        return verify(sm, Suspect.from_embedder(emb), adapter, probes, "acme", max_queries=512, alpha=1e-3, **kw)

    plain = check(CleanEncoder(st))
    assert plain.verdict == "stolen" and plain.tests["distribution"].p_value <= 1e-3, plain.summary()
    assert plain.queries["total"] <= 512 and "cluster" in plain.tests
    rot = check(rotate(CleanEncoder(st), dim=dim))
    assert rot.tests["distribution"].p_value > 1e-2 and rot.tests["permutation"].p_value > 1e-3, rot.summary()
    # (the rotated student's cluster p on this test CLIP with EXTRACT: 2.6e-10, 3.6e-11, 8.9e-9 for
    # student seeds 0, 1, 2, measured; 1.0e-10 on the benchmark's small CLIP)
    assert rot.tests["cluster"].p_value <= 1e-4 and rot.verdict == "stolen", rot.summary()
    perm = check(permute(CleanEncoder(st), dim=dim, signs=True))
    assert perm.tests["permutation"].p_value <= 1e-3 and perm.verdict == "stolen", perm.summary()
    for d in innocent_dirs:
        r = check(CleanEncoder(load_clip(d)))
        assert r.verdict == "not-detected" and r.tests["cluster"].p_value > 1e-3, r.summary()
    # a rotated relay: the covariance test works on the probe captions the text layer leaves alone
    relay = check(rotate(service, dim=dim))
    assert relay.tests["covariance"].p_value <= 1e-6 and relay.verdict == "stolen", relay.summary()
