"""A black-box suspect over HTTP: anything that serves embeddings, seen only through its API.

``HTTPSuspect(url, key, schema="ipshield"|"openai", budget=N)`` has the embedder interface the
verification uses (``embed_images(float [B,3,H,W] in [0,1]) -> [B,D]``, ``embed_texts(list[str]) ->
[N,D]``, torch tensors), so ``ipshield.watermark.verify`` runs unchanged against a remote API.

Schemas:
- ``ipshield``: this project's service: ``POST {url}/v1/embed/images`` ``{"images": [base64 PNG]}``,
  ``POST {url}/v1/embed/texts`` ``{"texts": [...]}``; answers ``{"embeddings": [[...]]}``.
- ``openai``: ``POST {url}/v1/embeddings`` (or ``{url}`` itself when it already ends in
  ``/embeddings``) with ``{"model": M, "input": [...]}``; texts are plain strings, images
  ``{"image": "data:image/png;base64,..."}`` objects (the convention of multimodal OpenAI-style
  APIs); answers ``{"data": [{"index": i, "embedding": [...]}]}`` (sorted by ``index``).
The key goes in ``Authorization: Bearer KEY`` (and ``X-API-Key`` for the ipshield schema).

Every item sent counts as one query; ``budget`` caps them (``QueryBudgetExceeded`` before any
request that would pass it). Answers are checked: one vector per input, one size throughout,
finite values; anything else is an ``IPShieldError`` naming the problem (never a silent result).
A 429 is retried after ``Retry-After`` (at most ``retries`` times). The key never appears in a
repr, an error or a log line.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Sequence

import numpy as np

from ipshield.errors import IPShieldError

SCHEMAS = ("ipshield", "openai")


class QueryBudgetExceeded(IPShieldError):
    pass


class SuspectError(IPShieldError):
    pass


def encode_png(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_uint8_images(images) -> list[np.ndarray]:
    """float [B,3,H,W] in [0,1] (torch or numpy) or a list of uint8 [H,W,3] -> list of uint8 [H,W,3]."""
    if isinstance(images, (list, tuple)):
        return [np.ascontiguousarray(np.asarray(x, dtype=np.uint8)) for x in images]
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.dtype == np.uint8:
        return [np.ascontiguousarray(x) for x in (a if a.shape[-1] == 3 else a.transpose(0, 2, 3, 1))]
    if a.ndim != 4 or a.shape[1] != 3:
        raise IPShieldError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(a.shape)}", "pass RGB batches")
    a = np.clip(np.rint(a.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(x) for x in a]


class HTTPSuspect:
    def __init__(self, url: str, key: str | None = None, schema: str = "ipshield", budget: int | None = None,
                 batch_size: int = 32, timeout: float = 120.0, model: str | None = None, retries: int = 5,
                 transport=None):
        if schema not in SCHEMAS:
            raise IPShieldError(f"unknown suspect schema {schema!r}", f"use one of {', '.join(SCHEMAS)}")
        if not url.startswith(("http://", "https://")):
            raise IPShieldError(f"suspect URL {url!r} is not http(s)", "give the API's base URL, e.g. https://api.example.com")
        import httpx

        self.url = url.rstrip("/")
        self.schema = schema
        self.budget = budget
        self.batch_size = max(1, int(batch_size))
        self.model = model
        self.retries = retries
        self.queries = 0
        self.requests = 0
        self.dim: int | None = None
        headers = {"User-Agent": "ipshield-verify"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
            if schema == "ipshield":
                headers["X-API-Key"] = key
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def __repr__(self) -> str:
        return f"HTTPSuspect(url={self.url!r}, schema={self.schema!r}, queries={self.queries}, budget={self.budget})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an HTTPSuspect holds an API key and cannot be pickled")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HTTPSuspect":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ embedder interface
    def embed_images(self, images):
        imgs = to_uint8_images(images)
        payload = [encode_png(x) for x in imgs]
        return self._embed("image", payload)

    def embed_texts(self, texts: Sequence[str]):
        if isinstance(texts, str):
            texts = [texts]
        return self._embed("text", [str(t) for t in texts])

    # ------------------------------------------------------------------ internals
    def _embed(self, kind: str, items: list):
        import torch

        out = []
        for i in range(0, len(items), self.batch_size):
            out.append(self._request(kind, items[i : i + self.batch_size]))
        if not out:
            return torch.zeros(0, self.dim or 0)
        return torch.from_numpy(np.concatenate(out).astype(np.float32))

    def _spend(self, n: int) -> None:
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(
                f"the query budget ({self.budget}) would be exceeded: {self.queries} spent, {n} more needed",
                "raise --budget, or verify with fewer queries (fewer triggers/probes)")
        self.queries += n

    def _endpoint(self, kind: str) -> tuple[str, dict]:
        if self.schema == "ipshield":
            return (f"{self.url}/v1/embed/images", "images") if kind == "image" else (f"{self.url}/v1/embed/texts", "texts")
        url = self.url if self.url.endswith("/embeddings") else f"{self.url}/v1/embeddings"
        return url, "input"

    def _request(self, kind: str, batch: list) -> np.ndarray:
        import httpx

        self._spend(len(batch))
        url, field = self._endpoint(kind)
        if self.schema == "openai":
            inputs = [{"image": "data:image/png;base64," + b} for b in batch] if kind == "image" else batch
            body = {"input": inputs}
            if self.model:
                body["model"] = self.model
        else:
            body = {field: batch}
        for attempt in range(self.retries + 1):
            try:
                r = self._client.post(url, json=body)
            except httpx.HTTPError as exc:
                raise SuspectError(f"cannot reach the suspect API ({type(exc).__name__})", "check --suspect-url and the network") from None
            self.requests += 1
            if r.status_code == 429 and attempt < self.retries:
                try:
                    wait = float(r.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                time.sleep(min(max(wait, 0.1), 30.0))
                continue
            break
        if r.status_code in (401, 403):
            raise SuspectError(f"the suspect API refused the key (HTTP {r.status_code})", "check --suspect-key")
        if r.status_code >= 400:
            raise SuspectError(f"the suspect API answered HTTP {r.status_code} to a {kind} request",
                               "check --suspect-url and --suspect-schema (ipshield or openai)")
        try:
            data = r.json()
        except ValueError:
            raise SuspectError("the suspect API did not answer JSON", "check --suspect-schema") from None
        vecs = self._parse(data)
        if len(vecs) != len(batch):
            raise SuspectError(f"the suspect returned {len(vecs)} vectors for {len(batch)} inputs", "check --suspect-schema")
        try:
            arr = np.asarray(vecs, dtype=np.float64)
        except (ValueError, TypeError):
            raise SuspectError("the suspect returned vectors of different sizes or non-numbers", "this API cannot be verified as is") from None
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise SuspectError(f"the suspect returned embeddings of shape {arr.shape}", "check --suspect-schema")
        if self.dim is None:
            self.dim = int(arr.shape[1])
        elif arr.shape[1] != self.dim:
            raise SuspectError(f"the suspect changed its embedding size ({self.dim} then {arr.shape[1]})", "this API cannot be verified as is")
        if not np.all(np.isfinite(arr)):
            raise SuspectError("the suspect returned non-finite values (NaN or inf)", "this API cannot be verified as is")
        return arr

    def _parse(self, data) -> list:
        if self.schema == "ipshield":
            if not isinstance(data, dict) or not isinstance(data.get("embeddings"), list):
                raise SuspectError("the suspect's answer has no 'embeddings' list", "try --suspect-schema openai")
            return data["embeddings"]
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise SuspectError("the suspect's answer has no 'data' list", "try --suspect-schema ipshield")
        rows = data["data"]
        try:
            rows = sorted(rows, key=lambda d: int(d.get("index", 0)))
            return [d["embedding"] for d in rows]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise SuspectError("the suspect's 'data' items have no 'embedding'", "check --suspect-schema") from None
