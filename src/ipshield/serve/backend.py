"""What the service runs: an ``EmbeddingBackend`` (clean, unit-norm embeddings of a batch) and a
per-customer transform applied to the rows of each customer (the watermark).

The two are kept apart on purpose: micro-batching runs one forward pass over the requests of many
customers, then each customer's rows get that customer's transform, together with the inputs
behind the rows (a scheme with a text layer, EmbMarker's trigger words, reads the texts).

The transform contract (``CustomerTransform``)::

    served = transform(customer, clean, kind, items)   # clean float32 [B, D] -> served [B, D]
    transform.prepare(customer)    # derive and cache what the customer needs (off the model thread)
    transform.cached(customer)     # True once prepared

``kind`` is ``"image"`` or ``"text"``; ``items`` are the request's inputs, row for row: the texts
for ``"text"``, the decoded uint8 ``[H, W, 3]`` arrays for ``"image"``. Implementations:
``MatrixTransform`` (``normalise(e @ W_customer)``, one matmul: VLPMarker and the key's start
matrices) and ``SchemeTransform`` (any registered watermark scheme through its own per-customer
``postprocessors``; texts reach its text layer). No key, matrix or trigger word is ever put in a
repr, a log line, a pickle or a response.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ipshield.errors import CheckpointError, IPShieldError


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Clean embeddings. ``embed_images``: uint8 ``[H, W, 3]`` arrays (any sizes) -> float32 ``[B, dim]``;
    ``embed_texts``: strings -> float32 ``[N, dim]``. Rows are L2-normalised."""

    dim: int

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


KINDS = ("image", "text")


@runtime_checkable
class CustomerTransform(Protocol):
    """The per-customer watermark of the served rows (see the module docstring).

    ``__call__(customer, clean [B, D] float32, kind "image" | "text", items: the B inputs) ->
    served [B, D]`` runs in the model thread, so it must be quick once the customer is prepared.
    ``prepare(customer)`` derives and caches what a customer needs (the app calls it once, in a
    worker thread, before the customer's first request is batched; calling it again is cheap);
    ``cached(customer)`` says whether that was done."""

    def __call__(self, customer: str, clean: np.ndarray, kind: str, items: Sequence[Any]) -> np.ndarray: ...

    def prepare(self, customer: str) -> None: ...

    def cached(self, customer: str) -> bool: ...


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


class EmbedderBackend:
    """Serve any *embedder* (``embed_images(float [B, 3, H, W] in [0, 1])``, ``embed_texts(list[str])``,
    torch tensors or arrays: a ``CleanEncoder``, a student, an attacked model of
    ``ipshield.attacks.watermark``) as an ``EmbeddingBackend``: decoded images of one size go
    through it together, rows are renormalised. Used to stand up a suspect API in tests and demos."""

    def __init__(self, embedder, dim: int, name: str = "embedder"):
        self.embedder = embedder
        self.dim = int(dim)
        self.name = name
        self._lock = threading.Lock()

    def _rows(self, out, n: int) -> np.ndarray:
        x = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out, dtype=np.float32)
        if x.shape != (n, self.dim):
            raise ValueError(f"the embedder gave shape {x.shape} for {n} inputs")
        return _normalise(x)

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(np.shape(img)), []).append(i)
        with self._lock, torch.no_grad():
            for idx in groups.values():
                x = np.stack([np.asarray(images[i][..., :3], dtype=np.uint8) for i in idx])
                t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
                out[idx] = self._rows(self.embedder.embed_images(t), len(idx))
        return out

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with self._lock, torch.no_grad():
            return self._rows(self.embedder.embed_texts(list(texts)), len(texts))

    def __repr__(self) -> str:
        return f"EmbedderBackend({self.name!r}, dim={self.dim})"


class _PerCustomer:
    """A small LRU of per-customer values, in memory only. ``get`` derives a missing value once
    (derivations are serialised: they are CPU-bound, and the schemes' own caches are not meant for
    concurrent writers); a hit takes only a short lock, so the model thread is never held up by
    another customer's derivation."""

    def __init__(self, derive: Callable[[str], Any], size: int = 256):
        self._derive = derive
        self._values: OrderedDict[str, Any] = OrderedDict()
        self._size = max(1, int(size))
        self._lock = threading.Lock()
        self._derive_lock = threading.Lock()

    def _hit(self, customer: str):
        with self._lock:
            v = self._values.get(customer)
            if v is not None:
                self._values.move_to_end(customer)
            return v

    def get(self, customer: str):
        v = self._hit(customer)
        if v is not None:
            return v
        with self._derive_lock:
            v = self._hit(customer)  # derived by another thread meanwhile
            if v is None:
                v = self._derive(customer)
                with self._lock:
                    self._values[customer] = v
                    while len(self._values) > self._size:
                        self._values.popitem(last=False)
        return v

    def __contains__(self, customer: str) -> bool:
        return customer in self._values

    def __len__(self) -> int:
        return len(self._values)


def _check_rows(clean: np.ndarray, kind: str, items) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown input kind {kind!r}")
    if items is not None and len(items) != len(clean):
        raise ValueError(f"{len(items)} inputs for {len(clean)} embeddings")


class MatrixTransform:
    """Serve ``normalise(e @ W_customer)`` for images and texts alike (the inputs are not needed);
    ``matrix_for(customer_id) -> [D, D]`` is derived on demand (from the master key) and kept in a
    small LRU cache in memory only, never stored or sent. One torch matmul per customer per batch."""

    def __init__(self, matrix_for: Callable[[str], np.ndarray], cache_size: int = 256):
        self._matrix_for = matrix_for
        self._cache = _PerCustomer(
            lambda c: np.ascontiguousarray(np.asarray(self._matrix_for(c), dtype=np.float32)), cache_size)

    def matrix(self, customer_id: str) -> np.ndarray:
        return self._cache.get(customer_id)

    def prepare(self, customer_id: str) -> None:
        self._cache.get(customer_id)

    def cached(self, customer_id: str) -> bool:
        return customer_id in self._cache

    def __call__(self, customer_id: str, embeddings: np.ndarray, kind: str = "image", items=None) -> np.ndarray:
        _check_rows(embeddings, kind, items)
        w = self.matrix(customer_id)
        try:  # torch's matmul in the model thread: numpy's BLAS measured slower there under load
            import torch

            x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)) @ torch.from_numpy(w)
            return torch.nn.functional.normalize(x, dim=-1).numpy()
        except ImportError:  # pragma: no cover
            return _normalise(embeddings @ w)

    def __reduce__(self):
        raise TypeError("a MatrixTransform holds per-customer secrets and cannot be pickled")

    def __repr__(self) -> str:  # never print a matrix
        return f"MatrixTransform(cached={len(self._cache)})"


class SchemeTransform:
    """Serve a watermark of any registered scheme (``ipshield.watermark.base.load_watermark``)
    through the scheme's own per-customer functions, ``watermark.postprocessors(customer) ->
    (f_images(e), f_texts(e, texts))``: the texts of a request reach the scheme's text layer
    (EmbMarker's trigger words, and its mixing before VLPMarker's matrix in the stacked scheme), so
    the service serves exactly what ``watermark.encoder(adapter, customer)`` gives. The functions are
    derived once per customer (``prepare``) and kept in an LRU cache in memory only."""

    def __init__(self, watermark, cache_size: int = 256):
        self._wm = watermark
        self.scheme = str(getattr(watermark, "scheme", "?"))
        self._cache = _PerCustomer(self._derive, cache_size)

    def _derive(self, customer_id: str):
        # (not under no_grad: a scheme may fit per-customer parts by gradient steps, VLPMarker does)
        return tuple(self._wm.postprocessors(customer_id))

    def prepare(self, customer_id: str) -> None:
        self._cache.get(customer_id)

    def cached(self, customer_id: str) -> bool:
        return customer_id in self._cache

    def __call__(self, customer_id: str, embeddings: np.ndarray, kind: str, items) -> np.ndarray:
        import torch

        _check_rows(embeddings, kind, items)
        if kind == "text" and items is None:
            # never serve a text without the scheme's text layer
            raise ValueError("the texts are needed to apply this watermark to text embeddings")
        f_images, f_texts = self._cache.get(customer_id)
        e = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        out = f_texts(e, [str(t) for t in items]) if kind == "text" else f_images(e)
        return np.ascontiguousarray(out.detach().float().cpu().numpy())

    def __reduce__(self):
        raise TypeError("a SchemeTransform holds a watermark's secrets and cannot be pickled")

    def __repr__(self) -> str:  # the scheme's name only: no key, matrix or trigger word
        return f"SchemeTransform(scheme={self.scheme!r}, cached={len(self._cache)})"


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
