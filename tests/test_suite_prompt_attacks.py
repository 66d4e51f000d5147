"""The suite harness runs the CLIP prompt attacks (``prompt_attacks:``) on its trained prompt method
cells and writes their robust tables (``prompt-robust/``): a real tiny suite on two synthetic
domains with the test-preset small CLIP (CoOp, IP-CLIP, NTL-prompt; tiny epochs and attack steps),
its rerun (nothing computed), a changed and a removed ``prompt_attacks`` (only the attacks run again,
on the saved prompts), and the bad suites. One thread."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ipshield.bench import harness as H
from ipshield.errors import ConfigError
from ipshield.report.suite import run_suite_with_report

ATTACKS = ("prompt-finetune", "prompt-coop")
KS = (8, 16)
PROMPT_ATTACKS = ("prompt_attacks: {attacks: [prompt-finetune, prompt-coop], ks: [8, 16], n_test: 40,\n"
                  "                 options: {prompt-finetune: {steps: STEPS}, prompt-coop: {steps: STEPS}}}\n")


def _suite(tmp_path: Path, clip_dir: Path, attacks: str | None = PROMPT_ATTACKS, steps: int = 6,
           methods: str | None = None) -> Path:
    methods = methods or """
  - name: coop
    config: {epochs: 1, augment: false, batch_size: 32, max_train: 60}
  - name: ip-clip
    config: {scenario: target-specified, recipe: spec, epochs: 2, max_train: 100, augment: false, verdict: false}
  - name: ntl-prompt
    config: {scenario: target-specified, epochs: 1, max_train: 60}
"""
    text = f"""
name: prompt-attacks
source: synthetic
data: {{n_train: 60, n_test: 40, seed: 0}}
pairs: ["clean:inverted"]
seeds: [0]
model: {clip_dir}
device: cpu
methods:{methods}"""
    if attacks:
        text += attacks.replace("STEPS", str(steps))
    p = tmp_path / "suite.yaml"
    p.write_text(text)
    return p


def _run(path: Path, out: Path):
    return run_suite_with_report(path, out, show_progress=False, log=lambda m: None)


def _cell(out: Path, method: str) -> dict:
    return json.loads((out / "cells" / f"{method}__clean__inverted__s0.json").read_text())


def _protected_rows(out: Path) -> dict[str, list[dict]]:
    data = json.loads((out / H.PROMPT_ROBUST_DIR / "robust.json").read_text())
    return {m: [r for r in data["rows"] if r["method"] == m] for m in ("ip-clip", "ntl-prompt", "coop")}


def test_suite_attacks_prompt_methods_writes_robust_tables_and_resumes(tmp_path, small_clip_dir):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    res = _run(_suite(tmp_path, small_clip_dir), out)
    assert not res.failed and len(res.computed) == 3 and not res.attacked

    folder = out / H.PROMPT_ROBUST_DIR
    for f in ("robust.json", "robust.md", "robust.csv", "robust-labels.csv", "robust.html"):
        assert (folder / f).is_file(), f
    rows = _protected_rows(out)
    assert not rows["coop"]  # the unprotected reference itself is not attacked: it is every row's "unprotected"
    for method in ("ip-clip", "ntl-prompt"):
        got = rows[method]
        assert {(r["attack"], r["k"]) for r in got} == {(a, k) for a in ATTACKS for k in KS}
        for r in got:
            assert r["authorized"] == "clean" and r["unauthorized"] == "inverted" and r["seed"] == 0
            for c in ("attacked", "scratch", "unprotected", "margin", "acc_u_protected", "acc_u_source", "zero_shot"):
                assert r[c] is not None and 0.0 <= r[c] + (100.0 if c == "margin" else 0.0) <= 200.0, (c, r)
            assert r["margin"] == pytest.approx(r["attacked"] - r["scratch"])
    # one reference (the suite's cached CoOp) and one set of scratch references for the pair: computed once
    ip, ntl = rows["ip-clip"], rows["ntl-prompt"]
    assert [r["unprotected"] for r in ip] == [r["unprotected"] for r in ntl]
    assert [r["scratch"] for r in ip] == [r["scratch"] for r in ntl]
    assert len(list((out / "shared" / "prompt-refs").glob("*.json"))) == 1

    cell = _cell(out, "ip-clip")
    att = cell["attacks"]
    assert att["acc_u_protected"] == ip[0]["acc_u_protected"] and att["acc_u_source"] == ip[0]["acc_u_source"]
    for k in KS:  # the cost-to-break columns: prompt-finetune is the prompt model's "fine-tune k"
        assert att[f"finetune_k{k}"] == att[f"prompt-finetune_k{k}"]
        assert att[f"margin_k{k}"] == pytest.approx(att[f"finetune_k{k}"] - att[f"scratch_k{k}"])
    assert cell["prompt_robust"]["labels"] and cell["prompt_attacks_hash"]
    assert "attacks" not in _cell(out, "coop") and "prompt_attacks_hash" not in _cell(out, "coop")

    with (folder / "robust.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8 and "zero_shot" in csv_rows[0] and "margin" in csv_rows[0]
    assert "Prompt attacks" in (folder / "robust.md").read_text()
    page = (folder / "robust.html").read_text()
    assert "Prompt attacks and honest references" in page and "ip-clip" in page and "prompt-coop" in page
    assert 'href="prompt-robust/robust.html"' in (out / "report.html").read_text()
    assert "Cost to break" in (out / "results.md").read_text()

    # a rerun reuses every cell and its attacks
    res = _run(_suite(tmp_path, small_clip_dir), out)
    assert res.computed == [] and res.attacked == [] and len(res.reused) == 3

    # changed attack settings: the attacks alone run again, on the saved prompts (no retraining)
    seconds = {m: _cell(out, m)["seconds"] for m in ("coop", "ip-clip", "ntl-prompt")}
    res = _run(_suite(tmp_path, small_clip_dir, steps=7), out)
    assert res.computed == [] and sorted(res.attacked) == ["ip-clip__clean__inverted__s0", "ntl-prompt__clean__inverted__s0"]
    assert {m: _cell(out, m)["seconds"] for m in seconds} == seconds
    assert _cell(out, "ip-clip")["prompt_attacks_hash"] != cell["prompt_attacks_hash"]
    assert len(list((out / "shared" / "prompt-refs").glob("*.json"))) == 2

    # back to the first settings: the reloaded prompts give the figures of the freshly trained ones
    res = _run(_suite(tmp_path, small_clip_dir), out)
    assert res.computed == [] and len(res.attacked) == 2
    again = _protected_rows(out)
    for m in ("ip-clip", "ntl-prompt"):
        assert [r["attacked"] for r in again[m]] == pytest.approx([r["attacked"] for r in rows[m]], abs=1e-6)

    # prompt_attacks removed: the attack results leave the cells and the tables, nothing is recomputed
    res = _run(_suite(tmp_path, small_clip_dir, attacks=None), out)
    assert res.computed == [] and len(res.attacked) == 2
    assert "prompt_robust" not in _cell(out, "ip-clip") and not folder.exists()
    assert "prompt-robust" not in (out / "report.html").read_text()


def test_prompt_attacks_leave_the_other_cells_hashes_alone(tmp_path, small_clip_dir):
    plain = H.resolve_suite(_suite(tmp_path, small_clip_dir, attacks=None))
    attacked = H.resolve_suite(_suite(tmp_path, small_clip_dir))
    for a, b in zip(plain.methods, attacked.methods):
        assert H.cell_hash(plain, a) == H.cell_hash(attacked, b)
        assert H.prompt_attack_hash(plain, a) is None
        assert (H.prompt_attack_hash(attacked, b) is not None) == (b.name != "coop")
    # the built-in suites still validate; digits-clip's prompt attacks leave every cell hash as it was
    for name in H.builtin_suites():
        H.resolve_suite(name)
    clip = H.resolve_suite("digits-clip")
    assert clip.prompt_attacks is not None
    before = H.SuiteConfig.build({**clip.to_dict(), "prompt_attacks": None})
    assert [H.cell_hash(before, m) for m in before.methods] == [H.cell_hash(clip, m) for m in clip.methods]
    assert [m.name for m in clip.methods if H.prompt_attack_hash(clip, m)] == ["ntl-prompt", "ip-clip"]


@pytest.mark.parametrize("block, expected", [
    ("prompt_attacks: {attacks: [prompt-finetune, promt-coop]}\n",
     "unknown prompt attack(s) ['promt-coop']; the prompt attacks are: prompt-finetune, prompt-coop"),
    ("prompt_attacks: [finetune-direct-all]\n", "unknown prompt attack(s) ['finetune-direct-all']"),
    ("prompt_attacks: {attacks: [prompt-coop], stepz: 3}\n", "unknown key 'prompt_attacks.stepz'"),
    ("prompt_attacks: {attacks: [prompt-coop], options: {prompt-coop: {stepz: 3}}}\n", "unknown key 'stepz'"),
    ("prompt_attacks: {attacks: [prompt-coop], options: {prompt-finetune: {steps: 3}}}\n", "not among the attacks"),
    ("prompt_attacks: {attacks: [prompt-coop], options: {prompt-coop: {k: 3}}}\n", "which the suite sets"),
    ("prompt_attacks: {ks: []}\n", "ks must be a non-empty list"),
])
def test_bad_prompt_attacks_are_a_clear_config_error(tmp_path, block, expected):
    with pytest.raises(ConfigError) as e:
        H.resolve_suite(_suite(tmp_path, Path("/nonexistent-clip"), attacks=block))
    assert expected in e.value.problem


def test_prompt_attacks_without_a_prompt_method_is_a_clear_error(tmp_path):
    methods = "\n  - zero-shot\n  - coop\n"
    with pytest.raises(ConfigError, match="prompt_attacks, but no method to attack"):
        H.run_suite(_suite(tmp_path, Path("/nonexistent-clip"), methods=methods), tmp_path / "r", show_progress=False)
