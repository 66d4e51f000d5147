"""The CLIP adapter (equivalence with transformers' own CLIP, EOS pooling, layer taps, loading
errors), the small CLIP's tokenizer, and the zero-shot accuracy of the project's small CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ipshield.errors import CheckpointError, IPShieldError
from ipshield.models.clip import CLIPAdapter, load_clip
from ipshield.models.testing import make_random_clip
from ipshield.models.tiny_clip import EOS_ID, build_tokenizer

#: the lowest zero-shot accuracy (percent) required of the test preset on every synthetic style
#: (chance is 10%; measured values and the margin are in docs/models.md)
TEST_PRESET_MIN = 50.0

PROMPTS = [
    "a photo of the digit zero.",
    "nine",
    "an image of the handwritten number eight, a drawing of this digit seven written in x",
    "the digit four",
]


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory) -> Path:
    # a small random-weight CLIP with several heads per tower, so attention is exercised
    return make_random_clip(tmp_path_factory.mktemp("rclip") / "clip", vision_layers=3, vision_width=64,
                            vision_heads=4, patch=8, image_size=32, text_layers=3, text_width=48, text_heads=4,
                            embed_dim=40, context_length=24, seed=1)


@pytest.fixture(scope="module")
def rclip(random_clip_dir) -> CLIPAdapter:
    return load_clip(random_clip_dir)


def _hf_text(adapter: CLIPAdapter, ids: torch.Tensor) -> torch.Tensor:
    out = adapter.model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_image(adapter: CLIPAdapter, pixels: torch.Tensor) -> torch.Tensor:
    out = adapter.model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --------------------------------------------------------------------------- sizes and state
def test_sizes_read_from_checkpoint(rclip):
    assert (rclip.embed_dim, rclip.vision_width, rclip.vision_layers, rclip.text_width) == (40, 64, 3, 48)
    assert (rclip.image_size, rclip.patch_size, rclip.context_length) == (32, 8, 24)
    assert rclip.num_image_tokens == (32 // 8) ** 2 + 1
    assert rclip.image_mean == (0.5, 0.5, 0.5) and rclip.image_std == (0.5, 0.5, 0.5)
    assert rclip.logit_scale.ndim == 0


def test_frozen_by_default_but_differentiable_in_inputs(rclip):
    assert not any(p.requires_grad for p in rclip.parameters())
    parent = torch.nn.Sequential(rclip)
    parent.train()
    assert not rclip.training and not rclip.model.training  # a parent's .train() leaves it in eval
    ids = rclip.tokenize(PROMPTS[:2])
    emb = rclip.token_embedding(ids).clone().requires_grad_(True)
    rclip.encode_text_embeddings(emb, rclip.eos_positions(ids)).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in rclip.parameters())


# --------------------------------------------------------------------------- text tower
def test_text_embeddings_path_reproduces_get_text_features(rclip):
    ids = rclip.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), rclip.context_length)
    with torch.no_grad():
        ref = _hf_text(rclip, ids)
        ours = rclip.encode_text_embeddings(rclip.token_embedding(ids), rclip.eos_positions(ids), normalize=False)
        via_text = rclip.encode_text(PROMPTS, normalize=False)
    assert ours.shape == (len(PROMPTS), rclip.embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_text, ref, atol=1e-5, rtol=1e-5)
    normed = rclip.encode_text(PROMPTS)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(len(PROMPTS)))
    torch.testing.assert_close(normed, ref / ref.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_truncation_to_longest_prompt_is_exact(rclip):
    ids = rclip.tokenize(PROMPTS)
    eos = rclip.eos_positions(ids)
    t = int(eos.max()) + 1
    assert t < rclip.context_length
    with torch.no_grad():
        full = rclip.encode_text_embeddings(rclip.token_embedding(ids), eos, normalize=False)
        short = rclip.encode_text_embeddings(rclip.token_embedding(ids[:, :t]), eos, normalize=False)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(IPShieldError):  # cutting before an EOS is refused, not silently wrong
        rclip.encode_text_embeddings(rclip.token_embedding(ids[:, : t - 1]), eos)


def test_eos_pooling_is_at_the_eos_token(rclip):
    assert rclip.eos_token_id == EOS_ID != 2
    assert rclip.model.config.text_config.eos_token_id == EOS_ID
    ids = rclip.tokenize(PROMPTS)
    eos = rclip.eos_positions(ids)
    for row, pos in zip(ids, eos):
        assert row[pos] == EOS_ID and (row[:pos] != EOS_ID).all()
    # word ids are larger than EOS, so the legacy "highest id" rule would pool at a word
    assert (ids.argmax(dim=-1) != eos).all()
    with torch.no_grad():
        at_eos = rclip.encode_text(ids, normalize=False)
        at_argmax = rclip.encode_text_embeddings(rclip.token_embedding(ids), ids.argmax(dim=-1), normalize=False)
        # whatever follows the EOS (padding, junk) cannot change a causal model's EOS state
        junk = ids.clone()
        after = torch.arange(ids.shape[1])[None] > eos[:, None]
        junk[after] = torch.randint(4, rclip.vocab_size, (int(after.sum()),))
        at_eos_junk = rclip.encode_text(junk, normalize=False)
    assert (at_eos - at_argmax).abs().max() > 1e-3
    torch.testing.assert_close(at_eos_junk, at_eos, atol=1e-5, rtol=1e-5)


def test_tokenizer_is_word_level_lowercase_with_specials():
    tok = build_tokenizer(["A photo of the digit Zero.", "one"])
    vocab = tok.get_vocab()
    assert {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}.items() <= vocab.items()
    enc = tok.encode("A PHOTO of the digit one.")
    assert enc.tokens == ["<bos>", "a", "photo", "of", "the", "digit", "one", ".", "<eos>"]
    assert tok.encode("a zebra").tokens == ["<bos>", "a", "<unk>", "<eos>"]


def test_saved_tokenizer_loads_with_autotokenizer(random_clip_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(random_clip_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 3, 0, 1)
    assert tok("the digit two")["input_ids"][-1] == 3


# --------------------------------------------------------------------------- image tower
def test_encode_image_matches_get_image_features_and_layer_taps(rclip):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 28, 28, generator=g)  # any input size: preprocess resizes to the model's
    pixels = rclip.preprocess(x)
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        ref = _hf_image(rclip, pixels)
        feats = rclip.encode_image(pixels, normalize=False)
        normed, layers = rclip.encode_image_with_layers(pixels)
        hs = rclip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed, ref / ref.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert len(layers) == rclip.vision_layers
    for layer in layers:
        assert layer.shape == (3, rclip.num_image_tokens, rclip.vision_width)
    # the taps are the block outputs transformers reports (its hidden_states[0] is the input of block 1)
    for tap, h in zip(layers, hs[-rclip.vision_layers:]):
        torch.testing.assert_close(tap, h, atol=1e-5, rtol=1e-5)


def test_preprocess_normalises_and_crops(rclip):
    x = torch.full((2, 3, 40, 64), 0.5)
    px = rclip.preprocess(x)  # non-square: shorter side to 32, centre crop
    assert px.shape == (2, 3, 32, 32)
    torch.testing.assert_close(px, torch.zeros_like(px), atol=1e-5, rtol=0)  # (0.5 - 0.5) / 0.5
    same = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rclip.preprocess(same), (same - 0.5) / 0.5)


# --------------------------------------------------------------------------- loading errors
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_errors_name_the_problem(random_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(tmp_path / "nowhere")
    for missing, pattern in [("config.json", "config.json"), ("model.safetensors", "model.safetensors"),
                             ("tokenizer.json", "tokenizer")]:
        d = _copy(random_clip_dir, tmp_path / f"no-{missing}")
        (d / missing).unlink()
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_clip(d)
        assert err.value.fix
    # wrong shapes
    d = _copy(random_clip_dir, tmp_path / "shapes")
    w = load_file(str(d / "model.safetensors"))
    w["text_projection.weight"] = torch.zeros(8, 48)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="wrong shapes: text_projection.weight"):
        load_clip(d)
    # a config that promises more layers than the weights hold
    d = _copy(random_clip_dir, tmp_path / "layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_clip(d)
    # not a CLIP at all
    d = _copy(random_clip_dir, tmp_path / "bert")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 48}))
    with pytest.raises(CheckpointError, match="not a CLIP"):
        load_clip(d)
    # a CLIP without a ViT vision tower
    d = _copy(random_clip_dir, tmp_path / "novit")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vision_config"]["patch_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ViT"):
        load_clip(d)
    # pickled weights only: refused
    d = _copy(random_clip_dir, tmp_path / "pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_clip(d)
    # corrupt weights
    d = _copy(random_clip_dir, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_clip(d)


def test_unknown_backend_and_missing_open_clip(random_clip_dir):
    with pytest.raises(IPShieldError, match="unknown CLIP backend"):
        load_clip(random_clip_dir, backend="jax")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(IPShieldError, match=r"pip install ipshield\[openclip\]"):
            load_clip(random_clip_dir, backend="open_clip")
    else:  # pragma: no cover - only where open_clip is installed
        pytest.skip("open_clip is installed here")


def test_random_vit_b16_shaped_checkpoint(tmp_path):
    d = make_random_clip(tmp_path / "b16")  # defaults: the ViT-B/16 shape
    clip = load_clip(d)
    assert (clip.vision_layers, clip.vision_width, clip.patch_size, clip.image_size) == (12, 768, 16, 224)
    assert (clip.text_layers, clip.text_width, clip.embed_dim, clip.num_image_tokens) == (12, 512, 512, 197)
    with torch.no_grad():
        feats, layers = clip.encode_image_with_layers(clip.preprocess(torch.rand(2, 3, 32, 32)))
        ids = clip.tokenize(["a photo of the digit one."])
        torch.testing.assert_close(clip.encode_text(ids, normalize=False), _hf_text(clip, ids), atol=1e-4, rtol=1e-4)
    assert feats.shape == (2, 512) and len(layers) == 12 and layers[0].shape == (2, 197, 768)


# --------------------------------------------------------------------------- small CLIP: recipe pieces
def test_multi_positive_loss_matches_a_loop():
    from ipshield.models.tiny_clip import multi_positive_contrastive_loss

    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    scale = torch.tensor(2.0)
    ours = multi_positive_contrastive_loss(f, t, y, scale)
    s = scale.exp() * f @ t.t()
    total = 0.0
    for direction in (s, s.t()):
        for i in range(7):
            pos = [j for j in range(7) if y[j] == y[i]]
            logp = direction[i] - torch.logsumexp(direction[i], 0)
            total += -sum(logp[j] for j in pos) / len(pos) / 7
    torch.testing.assert_close(ours, total / 2)
    # perfectly separated classes at a high temperature: only the within-class entropy remains
    onehot = torch.nn.functional.one_hot(y, 5).float()
    low = multi_positive_contrastive_loss(onehot, onehot, y, torch.tensor(6.0))
    counts = torch.bincount(y).float()[y]
    torch.testing.assert_close(low, counts.log().mean(), atol=1e-3, rtol=0)


def test_lr_schedule_warms_up_then_decays():
    from ipshield.models.tiny_clip import PretrainConfig, lr_at

    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_config_hash_tracks_the_recipe():
    from ipshield.models.tiny_clip import config_hash, preset_config

    a = preset_config("test")
    assert config_hash(a) == config_hash(preset_config("test"))
    assert config_hash(a) != config_hash(preset_config("test", ["steps=301"]))
    assert config_hash(a) == config_hash(preset_config("test", ["threads=1"]))  # threads do not change weights
    with pytest.raises(Exception, match="unknown key"):
        preset_config("test", ["stepz=3"])


# --------------------------------------------------------------------------- small CLIP: the test preset
def test_small_clip_is_an_ordinary_cached_hf_clip(small_clip_dir, small_clip):
    from transformers import CLIPModel

    from ipshield.models.tiny_clip import small_clip as small_clip_fn

    assert small_clip_fn("test") == small_clip_dir  # cached: the same folder, no retraining
    info = json.loads((small_clip_dir / "pretrain.json").read_text())
    assert small_clip_dir.name.endswith(info["config_hash"])
    model = CLIPModel.from_pretrained(str(small_clip_dir), use_safetensors=True)
    assert model.config.text_config.eos_token_id == small_clip.eos_token_id == EOS_ID
    assert small_clip.image_size == info["config"]["image_size"]
    # transformers' own text features agree with the adapter on the pretrained weights
    ids = small_clip.tokenize(["a photo of a seven.", "the digit two in colour"])
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        torch.testing.assert_close(small_clip.encode_text(ids, normalize=False), ref, atol=1e-5, rtol=1e-5)


def test_zero_shot_of_the_test_preset_is_well_above_chance(small_clip, synthetic_domains):
    from ipshield.protect.zeroshot import evaluate_zero_shot

    acc = evaluate_zero_shot(small_clip, synthetic_domains)
    assert set(acc) == set(synthetic_domains)
    # chance is 10%; the test preset (a short pretraining) measured TEST_PRESET_MIN or more on each style
    for name, value in acc.items():
        assert value >= TEST_PRESET_MIN, (name, acc)


def test_zero_shot_classifier_and_registry(small_clip, synthetic_domains):
    from ipshield.protect.zeroshot import ZeroShotClassifier, ZeroShotConfig, zero_shot_classifier
    from ipshield.registry import METHODS

    from ipshield.protect.zeroshot import zero_shot_job

    spec = METHODS.get("zero-shot")
    assert spec.run is zero_shot_job and spec.model == "clip" and spec.reference and spec.scenarios == ()
    dom = synthetic_domains["clean"]
    clf = zero_shot_classifier(small_clip, dom, ZeroShotConfig(templates=["a photo of a {}.", "the digit {class}"]))
    x = dom.test.to_tensor()[:8]
    logits = clf.predict_logits(x)
    assert logits.shape == (8, 10)
    # the ensemble is the re-normalised mean of the per-template class features
    single = [ZeroShotClassifier(small_clip, dom.classes, [t]).text_features for t in clf.templates]
    mean = torch.nn.functional.normalize(single[0] + single[1], dim=-1)
    torch.testing.assert_close(clf.text_features, mean, atol=1e-5, rtol=1e-5)
    feats = small_clip.encode_image(small_clip.preprocess(x))
    torch.testing.assert_close(logits, small_clip.logit_scale.exp() * feats @ mean.t(), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="no '\\{\\}'"):
        ZeroShotConfig(templates=["a photo"])


def test_cli_pretrain_and_zero_shot(tmp_path, small_clip_dir):
    from ipshield.cli import main

    out = tmp_path / "run"
    main(["pretrain", "--out", str(out), "--preset", "test", "steps=4", "n_per_domain=20", "eval_n_test=10",
          "domains=[clean,noisy]"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "pretrain" and set(metrics["accuracy"]["after"]) >= {"clean", "noisy"}
    assert (out / "clip" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert load_clip(out).path == out / "clip"  # a pretrain run folder is accepted as the model path
    main(["zero-shot", "--model", str(small_clip_dir), "--domains", "clean,noisy", "--out", str(tmp_path / "zs")])
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert zs["method"] == "zero-shot" and set(zs["accuracy"]["after"]) == {"clean", "noisy"}
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--out", str(tmp_path / "bad"), "--preset", "test", "stepz=4"])
    assert exit_.value.code == 2


def test_pretraining_with_two_workers_gives_bitwise_the_same_weights(tmp_path):
    """The two-tower threaded step (``workers=2``) is a speed-up only: the weights equal the
    one-thread loop's bit for bit, so cached models stay valid (docs/models.md, pretraining speed)."""
    from safetensors.torch import load_file

    from ipshield.models.tiny_clip import config_hash, pretrain, preset_config

    over = ["steps=6", "n_per_domain=20", "domains=[clean,noisy]", "warmup_steps=2"]
    one = pretrain(preset_config("test", over + ["workers=1"]), tmp_path / "one", show_progress=False, evaluate=False)
    two = pretrain(preset_config("test", over + ["workers=2"]), tmp_path / "two", show_progress=False, evaluate=False)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "workers=2 changed the weights"
    assert json.loads((two / "pretrain.json").read_text())["workers"] == 2
    assert config_hash(preset_config("test", over + ["workers=1"])) == config_hash(preset_config("test", over + ["workers=2"]))


def test_demo_pretrains_the_innocent_model_in_a_background_process(tmp_path, monkeypatch):
    """``ipshield demo`` on an empty cache pretrains the watermark part's innocent model in a child
    process alongside the small CLIP; afterwards the cache holds it and ``small_clip`` returns at once."""
    from rich.console import Console

    from ipshield import demo
    from ipshield.models import tiny_clip

    monkeypatch.setenv("IPSHIELD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_clip, "usable_cores", lambda: 2)
    over = ["steps=4", "n_per_domain=20", "domains=[clean]", "warmup_steps=1", "eval_n_test=10"]
    log = tmp_path / "innocent.log"
    proc = demo._pretrain_in_background("test", over, log, Console(file=open(tmp_path / "console.txt", "w")))
    assert proc is not None and proc.wait(timeout=300) == 0, log.read_text()
    assert tiny_clip.is_cached("test", over)
    assert demo._pretrain_in_background("test", over, log, Console(file=open(tmp_path / "c2.txt", "w"))) is None
    assert json.loads((tiny_clip.small_clip("test", over) / "pretrain.json").read_text())["workers"] == 1
