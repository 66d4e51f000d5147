"""What the service runs: an ``EmbeddingBackend`` (clean, unit-norm embeddings of a batch) and a
per-customer transform applied to the rows of each customer (the watermark).

The two are kept apart on purpose: micro-batching runs one forward pass over the requests of many
customers, then each customer's rows get that customer's transform.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ipshield.errors import CheckpointError, IPShieldError


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Clean embeddings. ``embed_images``: uint8 ``[H, W, 3]`` arrays (any sizes) -> float32 ``[B, dim]``;
    ``embed_texts``: strings -> float32 ``[N, dim]``. Rows are L2-normalised."""

    dim: int

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


# customer id, clean embeddings [B, D] -> served embeddings [B, D]
CustomerTransform = Callable[[str, np.ndarray], np.ndarray]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class StubBackend:
    """A deterministic, model-free stand-in (tests and benchmarks of the service machinery).

    Images: nearest-neighbour resize to 16x16, a fixed random projection. Texts: hashed character
    trigrams, a fixed random projection. Similar inputs get similar vectors; it is not a CLIP."""

    def __init__(self, dim: int = 64, seed: int = 0, delay_ms: float = 0.0):
        rng = np.random.default_rng(seed)
        self.dim = int(dim)
        self._p_img = rng.standard_normal((16 * 16 * 3, self.dim)).astype(np.float32) / np.sqrt(768.0)
        self._p_txt = rng.standard_normal((2048, self.dim)).astype(np.float32) / np.sqrt(64.0)
        self.delay_ms = float(delay_ms)
        self.name = f"stub-{self.dim}"

    def _wait(self) -> None:
        if self.delay_ms > 0:
            import time

            time.sleep(self.delay_ms / 1000.0)

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        self._wait()
        rows = []
        for img in images:
            h, w = img.shape[:2]
            ys = (np.arange(16) * h) // 16
            xs = (np.arange(16) * w) // 16
            small = img[ys][:, xs, :3].astype(np.float32) / 255.0
            rows.append(small.reshape(-1) - 0.5)
        return _normalise(np.stack(rows) @ self._p_img)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self._wait()
        feats = np.zeros((len(texts), 2048), dtype=np.float32)
        for i, t in enumerate(texts):
            s = f"  {t.lower()}  "
            for j in range(len(s) - 2):
                h = int.from_bytes(hashlib.blake2b(s[j : j + 3].encode(), digest_size=4).digest(), "little")
                feats[i, h % 2048] += 1.0
        return _normalise(feats @ self._p_txt + 1e-6)


class ClipBackend:
    """The real model: ``ipshield.models.clip.load_clip(dir)``; images resized by the adapter's own
    ``preprocess`` one by one (requests mix sizes), then encoded in one batch."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from ipshield.models.clip import load_clip

        self._torch = torch
        self.adapter = load_clip(model_dir, device=device)
        self.adapter.eval()
        self.device = torch.device(device)
        self.dim = int(self.adapter.embed_dim)
        self.name = "clip"
        self._lock = threading.Lock()  # one forward pass at a time (torch already uses every core)

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            # images of one size are preprocessed together, the others one by one
            groups: dict[tuple, list[int]] = {}
            for i, img in enumerate(images):
                groups.setdefault(tuple(img.shape), []).append(i)
            pix: list = [None] * len(images)
            for idx in groups.values():
                x = torch.from_numpy(np.stack([np.asarray(images[i][..., :3], dtype=np.uint8) for i in idx])).to(self.device)
                x = self.adapter.preprocess(x.permute(0, 3, 1, 2).float().div_(255.0))
                for k, i in enumerate(idx):
                    pix[i] = x[k : k + 1]
            out = self.adapter.encode_image(torch.cat(pix), normalize=True)
        return out.float().cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            out = self.adapter.encode_text(list(texts), normalize=True)
        return out.float().cpu().numpy()


class MatrixTransform:
    """Serve ``normalise(e @ W_customer)``; ``matrix_for(customer_id) -> [D, D]`` is derived on demand
    (from the master key) and kept in a small LRU cache in memory only, never stored or sent."""

    def __init__(self, matrix_for: Callable[[str], np.ndarray], cache_size: int = 256):
        self._matrix_for = matrix_for
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def matrix(self, customer_id: str) -> np.ndarray:
        with self._lock:
            w = self._cache.get(customer_id)
            if w is not None:
                self._cache.move_to_end(customer_id)
                return w
        w = np.ascontiguousarray(np.asarray(self._matrix_for(customer_id), dtype=np.float32))
        with self._lock:
            self._cache[customer_id] = w
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return w

    def cached(self, customer_id: str) -> bool:
        return customer_id in self._cache

    def __call__(self, customer_id: str, embeddings: np.ndarray) -> np.ndarray:
        w = self.matrix(customer_id)
        try:  # torch's matmul in the model thread: numpy's BLAS measured slower there under load
            import torch

            x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)) @ torch.from_numpy(w)
            return torch.nn.functional.normalize(x, dim=-1).numpy()
        except ImportError:  # pragma: no cover
            return _normalise(embeddings @ w)

    def __repr__(self) -> str:  # never print a matrix
        return f"MatrixTransform(cached={len(self._cache)})"


def seeded_orthogonal(secret: bytes, customer_id: str, dim: int) -> np.ndarray:
    """A stand-in per-customer orthogonal matrix (QR of a Gaussian seeded by a hash of the secret and
    the customer; signs fixed). Used only by the stub backend's tests; the real service derives the
    matrices with ``ipshield.watermark.keys``."""
    seed = int.from_bytes(hashlib.sha256(secret + b"\0" + customer_id.encode()).digest()[:8], "little")
    g = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))[None, :]
    return q.astype(np.float32)


def load_backend(model: str | None, device: str = "cpu") -> EmbeddingBackend:
    """``model`` is a CLIP folder, or ``stub`` / ``stub:DIM`` for the stand-in."""
    if model is None:
        raise IPShieldError("no model given", "pass --model DIR (a CLIP folder) or --model stub")
    if model == "stub" or model.startswith("stub:"):
        dim = int(model.split(":", 1)[1]) if ":" in model else 64
        return StubBackend(dim=dim)
    from pathlib import Path

    if not Path(model).is_dir():
        raise CheckpointError(f"model folder {model} does not exist", "pass --model with a CLIP folder (e.g. from `ipshield pretrain`)")
    return ClipBackend(model, device=device)
