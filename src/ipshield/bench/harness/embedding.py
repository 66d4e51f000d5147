"""The embedding map's representation: class-similarity profiles and their 2-D PCA."""

from __future__ import annotations

from typing import Any


# ============================================================================ embedding map


def embedding_profiles(model, images) -> "Any":
    """[ours] The representation a prompt method changes: the image's L2-normalised class-similarity
    profile (its logits over the classes). The frozen image tower's features do not change under
    prompt learning, so the 'features after protection' are where the image lands relative to the
    protected class text features."""
    import torch

    with torch.no_grad():
        logits = torch.cat([model.predict_logits(images[i:i + 128]) for i in range(0, len(images), 128)]).float()
    return torch.nn.functional.normalize(logits, dim=-1).cpu().numpy()


def pca_2d(x) -> "Any":
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _u, _s, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:2].T
    if y.shape[1] < 2:
        y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
    return y.astype(np.float32)

