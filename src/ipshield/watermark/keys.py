"""The owner's secret: one master key, from which every per-customer transform is derived.

The master key is 32 random bytes kept in a JSON file the owner controls (written with mode 600)::

    {"format": "ipshield-watermark-key", "version": 1, "dim": 512, "key_id": "1a2b3c4d", "secret_hex": "..."}

``dim`` is the embedding size of the service the key is meant for; ``key_id`` is a public
fingerprint (an HMAC of a fixed label, it reveals nothing about the secret) used to check that a
watermark folder and a key belong together.

Per-customer matrices are *derived*, never stored: ``HMAC-SHA256(secret, "vlpmarker/customer/" +
customer_id)`` seeds a float64 Gaussian D x D matrix, whose QR decomposition with the sign fix
``Q * sign(diag(R))`` gives an exactly orthogonal matrix (Haar distributed). The same key and
customer id always give the same matrix, on any machine (torch's CPU generator is seeded).

Nothing in this module puts the secret into a repr, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

import torch

from ipshield.errors import IPShieldError

KEY_FORMAT = "ipshield-watermark-key"
KEY_VERSION = 1
SECRET_BYTES = 32
_CUSTOMER_RE = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")


class WatermarkKeyError(IPShieldError):
    """A problem with a watermark key file (never shows the secret)."""


def check_customer_id(customer_id: str) -> str:
    """Customer ids are short printable names: letters, digits and ``_ . : @ -`` (at most 128)."""
    if not isinstance(customer_id, str) or not _CUSTOMER_RE.match(customer_id):
        raise IPShieldError(
            f"invalid customer id {str(customer_id)[:40]!r}",
            "use 1-128 characters from letters, digits and _ . : @ -",
        )
    return customer_id


def seed_from_bytes(seed: bytes) -> int:
    """A 63-bit integer seed for ``torch.Generator`` from derived bytes."""
    return int.from_bytes(seed[:8], "big") & ((1 << 63) - 1)


def orthogonal_from_seed(seed: bytes, dim: int) -> torch.Tensor:
    """An exactly orthogonal float64 matrix [dim, dim] from seed bytes (Haar measure: QR of a
    Gaussian with the signs of R's diagonal moved into Q)."""
    g = torch.Generator().manual_seed(seed_from_bytes(seed))
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs.unsqueeze(0)


class MasterKey:
    """The owner's secret (32 bytes) and the embedding size it is meant for.

    ``MasterKey.generate(dim)``, ``key.save(path)``, ``MasterKey.load(path)``;
    ``key.customer_start(customer_id)`` the exactly orthogonal start matrix of a customer;
    ``key.derive(label)`` bytes for any other secret choice (trigger pool, pairings, targets).
    """

    __slots__ = ("_secret", "dim")

    def __init__(self, secret: bytes, dim: int):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            raise WatermarkKeyError(f"a master key must be {SECRET_BYTES} bytes", "create one with `ipshield watermark keygen`")
        if not isinstance(dim, int) or dim < 2:
            raise WatermarkKeyError(f"embedding size must be an integer >= 2, got {dim!r}", "pass --dim with the service's embedding size")
        self._secret = bytes(secret)
        self.dim = int(dim)

    # -------------------------------------------------------------- creation, files
    @classmethod
    def generate(cls, dim: int) -> "MasterKey":
        return cls(secrets.token_bytes(SECRET_BYTES), dim)

    @property
    def key_id(self) -> str:
        """Public fingerprint (8 hex digits); reveals nothing about the secret."""
        return hmac.new(self._secret, b"ipshield/key-id", hashlib.sha256).hexdigest()[:8]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        p = Path(path).expanduser()
        if p.exists() and not overwrite:
            raise WatermarkKeyError(f"{p} already exists; refusing to overwrite a key", "choose another --out or delete the old key first")
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": KEY_FORMAT, "version": KEY_VERSION, "dim": self.dim, "key_id": self.key_id,
                "secret_hex": self._secret.hex()}
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None) -> "MasterKey":
        """Read a key file; with ``dim`` given, check it is meant for that embedding size."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise WatermarkKeyError(f"key file {p} does not exist", "create one with `ipshield watermark keygen --out KEY --dim D`")
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise WatermarkKeyError(f"key file {p} is not a readable JSON key", "give the file written by `ipshield watermark keygen`") from None
        if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
            raise WatermarkKeyError(f"{p} is not an ipshield watermark key", "give the file written by `ipshield watermark keygen`")
        try:
            secret = bytes.fromhex(str(data["secret_hex"]))
            kdim = int(data["dim"])
        except (KeyError, ValueError, TypeError):
            raise WatermarkKeyError(f"key file {p} is damaged (secret or dim unreadable)", "restore it from your backup") from None
        key = cls(secret, kdim)
        if data.get("key_id") not in (None, key.key_id):
            raise WatermarkKeyError(f"key file {p} is damaged (fingerprint does not match the secret)", "restore it from your backup")
        if dim is not None and kdim != int(dim):
            raise WatermarkKeyError(
                f"the key {p.name} is for {kdim}-dimensional embeddings but the model gives {int(dim)}",
                f"create a key for this model with `ipshield watermark keygen --dim {int(dim)}`",
            )
        try:
            mode = p.stat().st_mode & 0o777
            if mode & 0o077:
                import warnings

                warnings.warn(f"key file {p} is readable by other users (mode {oct(mode)}); run chmod 600 on it", stacklevel=2)
        except OSError:
            pass
        return key

    def check_dim(self, dim: int, what: str = "the model") -> None:
        if int(dim) != self.dim:
            raise WatermarkKeyError(
                f"the watermark key is for {self.dim}-dimensional embeddings but {what} gives {int(dim)}",
                f"use the key made for this model, or create one with `ipshield watermark keygen --dim {int(dim)}`",
            )

    # -------------------------------------------------------------- derivations
    def derive(self, label: str) -> bytes:
        """32 secret bytes for a purpose named by ``label`` (HMAC-SHA256)."""
        return hmac.new(self._secret, label.encode("utf-8"), hashlib.sha256).digest()

    def generator(self, label: str) -> torch.Generator:
        return torch.Generator().manual_seed(seed_from_bytes(self.derive(label)))

    def customer_seed(self, customer_id: str, scheme: str = "vlpmarker") -> bytes:
        return self.derive(f"{scheme}/customer/{check_customer_id(customer_id)}")

    def customer_start(self, customer_id: str) -> torch.Tensor:
        """The exactly orthogonal start matrix W_k (float64 [dim, dim]) of a customer."""
        return orthogonal_from_seed(self.customer_seed(customer_id), self.dim)

    # -------------------------------------------------------------- never show the secret
    def __repr__(self) -> str:
        return f"MasterKey(dim={self.dim}, key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):  # no pickling of the secret by accident (multiprocessing, caches)
        raise TypeError("a MasterKey cannot be pickled; pass the key file path instead")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._secret, other._secret) and self.dim == other.dim

    def __hash__(self) -> int:
        return hash(("MasterKey", self.key_id, self.dim))


def keygen(out: str | Path, dim: int, overwrite: bool = False) -> tuple[Path, MasterKey]:
    """Create a random master key for ``dim``-dimensional embeddings and save it (mode 600)."""
    key = MasterKey.generate(int(dim))
    return key.save(out, overwrite=overwrite), key


def orthogonality_error(w: torch.Tensor) -> float:
    """max |W^T W - I| (0 for an exactly orthogonal matrix)."""
    w = w.double()
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    return float((w.T @ w - eye).abs().max())
