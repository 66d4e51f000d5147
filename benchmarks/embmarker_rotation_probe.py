"""Can EmbMarker's trigger test be made to survive the thief's rotation without the key?
(docs/watermark.md, "Why a rotated student escapes", point 10.)

    .venv/bin/python benchmarks/embmarker_rotation_probe.py RUN [--customer customer-3] [--innocents 10]

RUN is an ``ipshield bench watermark`` run folder holding ``owner/`` and ``students/embmarker-6000``
(and ``-1500``), e.g. ``runs/bench-watermark-v3``; the innocent models are the bench's cached ones.
EmbMarker serves ordinary inputs unchanged, so a thief's rotation ``R`` of a student can be
estimated from ordinary probes without the key and undone before the trigger test. For each
suspect (the student as is, rotated, signed-permuted; the small student rotated; the clean model
and the innocent models rotated) it prints the trigger test's z:

- ``raw``: on the suspect's answers;
- ``procrustes``: after an orthogonal Procrustes alignment of the suspect to the clean model on the
  probes (key-free);
- ``permutation``: after the signed-permutation match of ``verify.match_coordinates`` (key-free;
  what the verification's ``permutation`` test does);
- ``gram``: a rotation-invariant statistic, the correlation over the probes of the suspect's
  cosines to its mean backdoor shift with the clean model's cosines to the target, against 200
  random targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    from ipshield.attacks.watermark import random_permutation, random_rotation
    from ipshield.models.clip import load_clip
    from ipshield.utils import cache_dir
    from ipshield.watermark.base import CleanEncoder, load_watermark, reference_from_synthetic
    from ipshield.watermark.verify import _centre_modalities, match_coordinates, procrustes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--customer", default="customer-3")
    ap.add_argument("--innocents", type=int, default=10)
    ap.add_argument("--probes", type=int, default=128, help="probe images and as many captions (as in a 512-query verification)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    run = args.run
    teacher = Path(json.loads((run / "config.json").read_text())["model"])
    wm = load_watermark(run / "owner" / "embmarker", run / "owner" / "key.json")
    cid, n = args.customer, args.probes
    probes = reference_from_synthetic(512, seed=9)
    clean = CleanEncoder(load_clip(teacher))
    dim = int(wm.dim)

    def probe_emb(enc) -> torch.Tensor:
        return torch.cat([enc.embed_images(probes.images[:n]), enc.embed_texts(probes.texts[:n])]).double()

    e = probe_emb(clean)
    ec = e - torch.cat([e[:n].mean(0).expand(n, -1), e[n:].mean(0).expand(n, -1)])
    plan = wm.trigger_queries_for([cid], 128)
    k = plan["k"]
    target = wm.target(cid).double()
    randoms = F.normalize(torch.randn(200, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64), dim=1)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))

    def report(name: str, enc, m: torch.Tensor) -> None:
        s = F.normalize(probe_emb(enc) @ m, dim=-1)
        tt = F.normalize(enc.embed_texts(plan["texts"]).double() @ m, dim=-1)
        out = [f"raw {wm.trigger_test(plan, None, tt, cid).z:6.1f}"]
        sc, ecn = _centre_modalities(s, n), _centre_modalities(e, n)
        for label, align in (("procrustes", procrustes(sc, ecn)), ("permutation", match_coordinates(s, e, n))):
            out.append(f"{label} {wm.trigger_test(plan, None, F.normalize(tt @ align, dim=-1), cid).z:6.1f}")
        shift = tt[:k].mean(0) - tt[k:2 * k].mean(0)
        c = (s - torch.cat([s[:n].mean(0).expand(n, -1), s[n:].mean(0).expand(n, -1)])) @ shift
        stat = corr(c, ec @ target)
        null = np.array([corr(c, ec @ r) for r in randoms])
        out.append(f"gram {(stat - null.mean()) / null.std(ddof=1):6.1f}")
        print(f"{name:26s} trigger z: " + "  ".join(out), flush=True)

    eye = torch.eye(dim, dtype=torch.float64)
    rot = random_rotation(dim).double()
    sperm = random_permutation(dim, signs=True).double()
    student = CleanEncoder(load_clip(run / "students" / "embmarker-6000"))
    report("student", student, eye)
    report("student rotated", student, rot)
    report("student signed-permuted", student, sperm)
    small = run / "students" / "embmarker-1500"
    if (small / "model.safetensors").is_file():
        report("student-1500 rotated", CleanEncoder(load_clip(small)), rot)
    report("clean model rotated", clean, rot)
    for i in range(args.innocents):
        d = cache_dir() / "watermark_bench" / f"innocent-600-{i}"
        if (d / "model.safetensors").is_file():
            report(f"innocent {i} rotated", CleanEncoder(load_clip(d)), rot)


if __name__ == "__main__":
    main()
