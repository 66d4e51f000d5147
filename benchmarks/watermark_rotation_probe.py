"""Does a VLPMarker student carry anything a thief's rotation leaves? (docs/watermark.md, "Why a
rotated student escapes", point 6.)

    .venv/bin/python benchmarks/watermark_rotation_probe.py RUN [--customer customer-3] [--innocents 3]

RUN is an ``ipshield bench watermark`` run folder that holds ``owner/`` and ``students/vlpmarker-6000``;
the point-6 run protected only the zero-shot template::

    ipshield bench watermark --out runs/wm-zs-span --model ~/.cache/ipshield/small_clip/default-5e7aca90c223 \
        --set schemes='["vlpmarker"]' --set budgets='[6000]' \
        --set vlpmarker_overrides='["prompt_templates=[\"a photo of the digit {}\"]", "signature=0.3"]'

(interrupt it once ``students/vlpmarker-6000`` is written; the rest is the usual benchmark). The
innocent models are the bench's cached ones. Prints, for the service (plain and rotated), the student (plain and rotated)
and the innocent models: the covariance test's z (``ipshield.watermark.verify.covariance_test``)
and a second rotation-invariant z read from the probe-probe cosines (``E^T (G_s - G_pre) E`` on the
customer's key-derived matrix: exactly standard normal when the suspect is not from this customer);
then how much the watermark and the student move the pairwise cosines of the probes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from ipshield.models.clip import load_clip
    from ipshield.utils import cache_dir
    from ipshield.watermark.base import CleanEncoder, load_watermark, reference_from_synthetic
    from ipshield.watermark.verify import _centre_modalities, covariance_test

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--customer", default="customer-3")
    ap.add_argument("--innocents", type=int, default=3)
    ap.add_argument("--innocent-steps", type=int, default=600)
    ap.add_argument("--n-probes", type=int, default=512)
    args = ap.parse_args()

    run = args.run
    teacher = Path(json.loads((run / "config.json").read_text())["model"])
    wm = load_watermark(run / "owner" / "vlpmarker", run / "owner" / "key.json")
    w = wm.matrix(args.customer).double()
    tpl = wm.signature_template(args.customer)
    probes = reference_from_synthetic(args.n_probes, seed=9)
    n = len(probes.images)

    def emb(adapter) -> torch.Tensor:
        enc = CleanEncoder(adapter)
        return torch.cat([enc.embed_images(probes.images), enc.embed_texts(probes.texts)]).double()

    e = emb(load_clip(teacher))

    def gram_z(s: torch.Tensor, t: dict) -> float:
        q, a = t["proj"].double(), t["a"].double()
        pre = torch.linalg.cholesky(t["base_gram"].double() + 1e-12 * torch.eye(len(a), dtype=torch.float64))
        ec, sc, bc = _centre_modalities(e, n), _centre_modalities(s, n), _centre_modalities(e @ pre, n)
        m = ec.T @ (sc @ sc.T - bc @ bc.T) @ ec
        p = q @ ((m + m.T) / 2) @ q
        return float((p * a).sum() / p.norm())

    rot = torch.linalg.qr(torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    served = F.normalize(e @ w, dim=-1)
    student = emb(load_clip(run / "students" / "vlpmarker-6000"))
    suspects = {"service": served, "service, rotated": served @ rot, "student-6000": student,
                "student-6000, rotated": student @ rot}
    innocents = {}
    for i in range(args.innocents):
        d = cache_dir() / "watermark_bench" / f"innocent-{args.innocent_steps}-{i}"
        if (d / "model.safetensors").is_file():
            innocents[f"innocent-{i}"] = emb(load_clip(d))
    suspects.update(innocents)
    print(f"{'suspect':24s} {'covariance z':>13s} {'gram z':>8s}")
    for name, s in suspects.items():
        print(f"{name:24s} {covariance_test(s, e, tpl, n).z:13.2f} {gram_z(s, tpl):8.2f}")
    for c in [c for c in (f"customer-{i}" for i in range(6)) if c != args.customer][:4]:
        t = wm.signature_template(c)
        print(f"student vs {c:13s} {covariance_test(student, e, t, n).z:13.2f} {gram_z(student, t):8.2f}")

    iu = torch.triu_indices(2 * n, 2 * n, 1)

    def cosines(x: torch.Tensor) -> torch.Tensor:
        x = _centre_modalities(x, n)
        return (x @ x.T)[iu[0], iu[1]]

    ge, gs, gt = cosines(e), cosines(served), cosines(student)
    corr = float(torch.corrcoef(torch.stack([gt - ge, gs - ge]))[0, 1])
    print(f"mean |cosine change|: watermark {float((gs - ge).abs().mean()):.4f}, student vs service "
          f"{float((gt - gs).abs().mean()):.4f}; corr(student - clean, service - clean) {corr:.4f}")
    for name, x in innocents.items():
        gi = cosines(x)
        print(f"  {name}: corr(innocent - clean, service - clean) {float(torch.corrcoef(torch.stack([gi - ge, gs - ge]))[0, 1]):.4f}")


if __name__ == "__main__":
    main()
