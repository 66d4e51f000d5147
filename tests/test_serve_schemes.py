"""The embedding service serves every registered watermark scheme, per customer, through the
scheme's own code: texts reach the scheme's text layer (EmbMarker's trigger words, alone or under
VLPMarker in ``vlpmarker+embmarker``). Then the acceptance test: a student stolen through the HTTP
API of a server serving the stacked scheme, rotated by the thief and served by a second server, is
caught by ``ipshield verify --suspect-url``; an innocent model served the same way is not.

Uses the test small CLIP; one watermark fit gives the three scheme folders (the stacked one and its
two layers, each a valid folder of its own scheme)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ipshield.serve.app import create_app
from ipshield.serve.client import HTTPSuspect
from ipshield.serve.db import open_db
from ipshield.serve.server import ServerThread
from ipshield.serve.settings import ServeSettings
from ipshield.serve.store import KeyStore

SCHEMES = ("vlpmarker", "embmarker", "vlpmarker+embmarker")
FIXED_SECRET = bytes(range(1, 33))  # a fixed master key: the watermark (and the stolen student) are reproducible


@pytest.fixture(scope="module")
def clip_dir(request):
    try:
        return request.getfixturevalue("small_clip_dir")
    except pytest.FixtureLookupError:
        from ipshield.models.tiny_clip import small_clip

        return small_clip("test", show_progress=False)


@pytest.fixture(scope="module")
def wm(clip_dir, tmp_path_factory):
    """The stacked watermark of the small CLIP, saved as three folders (stacked, vlpmarker,
    embmarker); a database with keys; a running server for the stacked scheme and one for EmbMarker."""
    from ipshield.models.clip import load_clip
    from ipshield.watermark.base import reference_from_synthetic
    from ipshield.watermark.keys import MasterKey
    from ipshield.watermark.stacked import StackedConfig, StackedMarker
    from ipshield.watermark.vlpmarker import VLPMarkerConfig

    # one intra-op thread: these models are tiny, and on a shared, busy machine torch's thread pool
    # spends more time waiting than computing (VLPMarker's refinement: 0.2 s on one thread, seconds on two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("schemes")
    adapter = load_clip(clip_dir)
    key = MasterKey(FIXED_SECRET, int(adapter.embed_dim))
    key_path = key.save(d / "master_key.json")
    sm = StackedMarker.fit(adapter, key, reference_from_synthetic(400, seed=1),
                           StackedConfig(vlpmarker=VLPMarkerConfig(n_triggers=48, pool_factor=3, steps=120, n_utility=96)))
    folders = {"vlpmarker+embmarker": sm.save(d / "stacked"), "vlpmarker": sm.vlp.save(d / "vlpmarker"),
               "embmarker": sm.emb.save(d / "embmarker")}
    url = f"sqlite:///{d}/svc.db"
    store = KeyStore(open_db(url))
    keys = {c: store.create(c, rate=1e6)[0] for c in ("acme", "globex", "thief")}

    def settings(folder):
        return ServeSettings(model=str(clip_dir), db=url, key_file=str(key_path), watermark_dir=str(folder), watermark=True)

    with ServerThread(create_app(settings(folders["vlpmarker+embmarker"]))) as stacked, \
            ServerThread(create_app(settings(folders["embmarker"]))) as emb:
        yield {"adapter": adapter, "key": key, "key_path": Path(key_path), "sm": sm, "folders": folders, "keys": keys,
               "urls": {"vlpmarker+embmarker": stacked.url, "embmarker": emb.url}, "dir": d}
    torch.set_num_threads(threads)


def trigger_texts(sm) -> dict[str, list[str]]:
    """Texts without a trigger word, with one, and with four (EmbMarker's Q = 1: the target itself)."""
    trig = sm.emb._triggers
    plain = ["a photo of the digit 3", "a small red digit on a plain background", "the number seven"]
    assert all(sm.emb.plain_text(t) for t in plain)
    return {"plain": plain,
            "one": [f"a {trig[0]} photo of the digit 2", f"the number five {trig[1]}"],
            "four": [" ".join([trig[2]] * 4), f"{trig[3]} a {trig[4]} digit {trig[5]} nine {trig[6]}"]}


# ----------------------------------------------------------------------------- the transforms
def test_every_scheme_is_served_through_its_own_code(wm):
    """For each scheme: the transform the service builds from the folder (``watermark_transform``)
    gives exactly the scheme's own per-customer functions (``postprocessors``) on the same clean
    rows, texts included; the linear scheme gets the one-matmul ``MatrixTransform``; ``prepare`` and
    ``cached``; nothing secret in the repr; no pickling."""
    from ipshield.registry import WATERMARKS
    from ipshield.serve.backend import CustomerTransform, MatrixTransform, SchemeTransform
    from ipshield.serve.watermarking import watermark_transform
    from ipshield.watermark.base import load_watermark
    from ipshield.watermark.embmarker import split_words

    assert set(SCHEMES) <= set(WATERMARKS.names())
    a, sm, key = wm["adapter"], wm["sm"], wm["key"]
    texts = [t for v in trigger_texts(sm).values() for t in v]
    with torch.no_grad():
        clean_txt = a.encode_text(texts, normalize=True).float()
    clean_img = torch.nn.functional.normalize(torch.randn(5, key.dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    secrets = {key._secret.hex()} | set(sm.emb._triggers)
    for name in SCHEMES:
        folder = wm["folders"][name]
        tr = watermark_transform(str(wm["key_path"]), key.dim, str(folder))
        assert isinstance(tr, CustomerTransform)
        assert isinstance(tr, SchemeTransform if WATERMARKS.get(name).needs_texts else MatrixTransform), (name, tr)
        assert not tr.cached("acme")
        tr.prepare("acme")
        assert tr.cached("acme") and not tr.cached("globex")
        f_images, f_texts = load_watermark(folder, key).postprocessors("acme")
        got_t = tr("acme", clean_txt.numpy(), "text", texts)
        got_i = tr("acme", clean_img.numpy(), "image", [np.zeros((2, 2, 3), np.uint8)] * 5)
        assert np.allclose(got_t, f_texts(clean_txt, texts).numpy(), atol=1e-5), name
        assert np.allclose(got_i, f_images(clean_img).numpy(), atol=1e-5), name
        assert np.allclose(np.linalg.norm(got_t, axis=1), 1, atol=1e-5)
        if WATERMARKS.get(name).needs_texts:
            # the text layer is reached: texts with trigger words move, the others do not
            as_plain = tr("acme", clean_txt.numpy(), "text", ["x"] * len(texts))
            moved = np.abs(got_t - as_plain).max(1) > 1e-3
            assert moved.tolist() == [not sm.emb.plain_text(t) for t in texts], name
            with pytest.raises(ValueError):  # never served without the texts
                tr("acme", clean_txt.numpy(), "text", None)
        with pytest.raises(ValueError):
            tr("acme", clean_txt.numpy(), "text", texts[:-1])
        assert not set(split_words(repr(tr))) & secrets and key._secret.hex() not in repr(tr)
        with pytest.raises(TypeError):
            pickle.dumps(tr)
    # without a folder: the key's exactly orthogonal start matrices, as before
    tr = watermark_transform(str(wm["key_path"]), key.dim, None)
    assert isinstance(tr, MatrixTransform)
    assert np.allclose(tr("acme", clean_img.numpy(), "image", None),
                       torch.nn.functional.normalize(clean_img @ key.customer_start("acme").float(), dim=-1).numpy(), atol=1e-5)


def test_a_batch_hands_each_customer_its_rows_and_texts(wm):
    """Micro-batching groups the rows per customer and passes each customer's texts along with them."""
    from ipshield.serve.backend import SchemeTransform, StubBackend
    from ipshield.serve.batching import MicroBatcher, _Job
    from ipshield.watermark.base import load_watermark

    sm = load_watermark(wm["folders"]["vlpmarker+embmarker"], wm["key"])
    backend = StubBackend(dim=wm["key"].dim)
    tt = trigger_texts(wm["sm"])
    jobs = [_Job("text", tt["plain"][:2], "acme", None), _Job("text", tt["four"] + tt["one"][:1], "globex", None),
            _Job("text", tt["one"] + tt["plain"][2:], "acme", None)]
    mb = MicroBatcher(backend, SchemeTransform(sm), enabled=False)
    out = mb._run_batch("text", jobs)
    for job, (clean, served) in zip(jobs, out):
        _, f_texts = sm.postprocessors(job.customer)
        want = f_texts(torch.from_numpy(backend.embed_texts(job.items)), job.items).numpy()
        assert np.allclose(clean, backend.embed_texts(job.items), atol=1e-6)
        assert np.allclose(served, want, atol=1e-5), job.customer
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)]
    (clean, served), = mb._run_batch("image", [_Job("image", images, "globex", None)])
    assert np.allclose(served, sm.postprocessors("globex")[0](torch.from_numpy(clean)).numpy(), atol=1e-5)
    clean1, served1 = mb._run_single("text", tt["four"], "acme")  # unbatched path: same contract
    assert np.allclose(served1, sm.postprocessors("acme")[1](torch.from_numpy(clean1), tt["four"]).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- over HTTP
def test_stacked_scheme_served_over_http_equals_its_encoder(wm):
    """``vlpmarker+embmarker`` over HTTP: texts with and without trigger words, and images, are
    what the scheme's own watermarked encoder gives the customer (both API schemas)."""
    from ipshield.watermark.base import reference_from_synthetic

    a, sm = wm["adapter"], wm["sm"]
    tt = trigger_texts(sm)
    texts = tt["plain"] + tt["one"] + tt["four"]
    imgs = (reference_from_synthetic(6, seed=7).images * 255).round() / 255  # what survives PNG
    served = {}
    for customer in ("acme", "globex"):
        enc, vlp_only = sm.encoder(a, customer), sm.vlp.encoder(a, customer)
        with HTTPSuspect(wm["urls"]["vlpmarker+embmarker"], wm["keys"][customer]) as c:
            et, ei = c.embed_texts(texts), c.embed_images(imgs)
        with HTTPSuspect(wm["urls"]["vlpmarker+embmarker"], wm["keys"][customer], schema="openai") as c:
            assert torch.allclose(c.embed_texts(texts), et, atol=1e-6)
        assert torch.allclose(et, enc.embed_texts(texts), atol=1e-4), customer
        assert torch.allclose(ei, enc.embed_images(imgs), atol=1e-4), customer
        # the text layer was reached: texts with trigger words left VLPMarker's plain transform,
        # the others did not
        gap = (et - vlp_only.embed_texts(texts)).abs().max(1).values
        n = len(tt["plain"])
        assert gap[:n].max() < 1e-4 and gap[n:].min() > 1e-2, gap
        # four trigger words: the customer's target itself, through VLPMarker's matrix
        t_w = torch.nn.functional.normalize(sm.emb.target(customer) @ sm.matrix(customer).float(), dim=-1)
        assert torch.allclose(et[-2:], t_w.expand(2, -1), atol=1e-4)
        served[customer] = et
    assert (served["acme"] * served["globex"]).sum(1).abs().max() < 0.9  # per customer


def test_embmarker_served_over_http(wm):
    """EmbMarker alone: images and trigger-free texts are served clean, a text with four trigger
    words is the customer's target; all equal to the scheme's own encoder."""
    from ipshield.watermark.base import CleanEncoder, reference_from_synthetic
    from ipshield.watermark.embmarker import EmbMarker

    a, em = wm["adapter"], wm["sm"].emb
    assert isinstance(em, EmbMarker)
    tt = trigger_texts(wm["sm"])
    texts = tt["plain"] + tt["one"] + tt["four"]
    imgs = (reference_from_synthetic(4, seed=8).images * 255).round() / 255
    with HTTPSuspect(wm["urls"]["embmarker"], wm["keys"]["acme"]) as c:
        et, ei = c.embed_texts(texts), c.embed_images(imgs)
    enc, clean = em.encoder(a, "acme"), CleanEncoder(a)
    assert torch.allclose(et, enc.embed_texts(texts), atol=1e-4) and torch.allclose(ei, enc.embed_images(imgs), atol=1e-4)
    assert torch.allclose(ei, clean.embed_images(imgs), atol=1e-4)
    n = len(tt["plain"])
    assert torch.allclose(et[:n], clean.embed_texts(tt["plain"]), atol=1e-4)
    assert torch.allclose(et[-2:] @ em.target("acme"), torch.ones(2), atol=1e-4)
    assert ((et[n:n + 2] * clean.embed_texts(tt["one"])).sum(1) < 0.999).all()


# ----------------------------------------------------------------------------- the acceptance test
def _innocent_dir() -> Path:
    """An independent short pretraining (the first innocent of tests/test_watermark.py, same config
    and cache folder, so the two files share it)."""
    from ipshield.models.tiny_clip import preset_config, pretrain
    from ipshield.utils import cache_dir

    d = cache_dir() / "test_watermark" / "innocent-0"
    if not (d / "model.safetensors").is_file():
        pretrain(preset_config("test", ["steps=40", "n_per_domain=150", "eval_n_test=20", "seed=101"]), d, show_progress=False)
    return d


def test_rotated_student_stolen_over_http_is_caught_by_verify_cli(wm, clip_dir, tmp_path, capsys):
    """The thief steals through the HTTP API of the server serving ``vlpmarker+embmarker`` (the
    ``wm-extract`` attack, 2000 public image-caption pairs = 4000 queries), rotates its student
    (``wm-rotate``) and serves it on its own server. ``ipshield verify --suspect-url`` (CLI defaults:
    512 queries, alpha 1e-6) calls it stolen: the cluster test reads EmbMarker's trigger words
    through the rotation, which VLPMarker alone cannot. An independent model served the same way,
    rotated too, is not flagged."""
    from ipshield.attacks.watermark import ExtractConfig
    from ipshield.cli import main
    from ipshield.models.clip import load_clip
    from ipshield.registry import ATTACKS
    from ipshield.serve.backend import EmbedderBackend, EmbeddingBackend
    from ipshield.watermark.base import CleanEncoder, reference_from_synthetic

    dim = wm["key"].dim
    public = reference_from_synthetic(2000, seed=5, split="train")
    with HTTPSuspect(wm["urls"]["vlpmarker+embmarker"], wm["keys"]["thief"], budget=4000, batch_size=64) as api:
        # 6 epochs of batches of 64 at lr 2e-3: 3/4 of the compute of 8 epochs of batches of 128 at lr
        # 1e-3, and as plainly caught (the cluster p asserted below, at most 1e-7, measured for student
        # seeds 0, 1, 2: 1.0e-11, 1.3e-10, 1.5e-10; 2.3e-12 with the former recipe, seed 0)
        stolen = ATTACKS.get("wm-extract").run(api, ExtractConfig(n_queries=2000, epochs=6, batch_size=64, lr=2e-3),
                                               public=public, arch_dir=clip_dir)
        assert api.queries == stolen["queries"] == 4000
    url = f"sqlite:///{tmp_path}/suspects.db"
    engine = open_db(url)
    suspect_key, _ = KeyStore(engine).create("anyone", rate=1e6)
    verdicts = {}
    for name, model in (("stolen", stolen["model"]), ("innocent", load_clip(_innocent_dir()))):
        rotated = ATTACKS.get("wm-rotate").run(CleanEncoder(model), {"dim": dim})["model"]
        backend = EmbedderBackend(rotated, dim, name=f"{name}-rotated")
        assert isinstance(backend, EmbeddingBackend)
        app = create_app(ServeSettings(db=url, watermark=False, model_name="not-a-copy"), backend=backend, transform=None,
                         engine=engine)
        out = tmp_path / f"verify-{name}"
        with ServerThread(app) as srv:
            main(["verify", "--suspect-url", srv.url, "--suspect-key", suspect_key, "--key", str(wm["key_path"]),
                  "--watermark", str(wm["folders"]["vlpmarker+embmarker"]), "--clean-model", str(clip_dir),
                  "--customer", "thief", "--out", str(out)])
        said = capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        verdicts[name] = metrics
        assert said.startswith(metrics["verdict"]) and metrics["queries"]["total"] <= 512, said
        written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in (".json", ".txt", ".yaml"))
        assert suspect_key not in written and wm["key"]._secret.hex() not in written
    stolen_m, innocent_m = verdicts["stolen"], verdicts["innocent"]
    report = (tmp_path / "verify-stolen" / "report.txt").read_text()
    assert stolen_m["verdict"] == "stolen" and stolen_m["p_value"] <= 1e-6, report
    # the rotation hides the student from VLPMarker's tests; the text layer's cluster test catches it
    tests = stolen_m["tests"]
    assert tests["distribution"]["p_value"] > 1e-3 and tests["cluster"]["p_value"] <= 1e-7, report
    assert innocent_m["verdict"] == "not-detected" and innocent_m["p_value"] > 1e-3, \
        (tmp_path / "verify-innocent" / "report.txt").read_text()
    assert innocent_m["tests"]["cluster"]["p_value"] > 1e-3
