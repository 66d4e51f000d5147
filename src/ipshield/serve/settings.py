"""Settings of the embedding service (one validated object; the CLI builds it from its options).

Every number is checked when the settings are built, before a model is loaded or a database opened:
counts and sizes are whole numbers >= 1, rates and times finite and > 0 (no NaN, no infinity),
quotas from 0 to 2^63 - 1 (the database's BIGINT), ``model`` a folder or ``stub``/``stub:DIM``, and
``device`` one of auto, cpu, cuda, cuda:N (whether CUDA is there is checked by the CLI with
``ipshield.utils.resolve_device``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from ipshield.config import BaseConfig
from ipshield.serve.limits_check import BIGINT_MAX

STUB_MAX_DIM = 16384  # the stand-in backend keeps two [*, DIM] projections in memory
_STUB_RE = re.compile(r"^stub(?::(.*))?$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ServeSettings(BaseConfig):
    """Everything ``create_app`` needs. Limits are enforced before any expensive work is done."""

    model: str | None = None  # a CLIP folder (``load_clip``); "stub" or "stub:D" = the deterministic stand-in backend
    db: str = "sqlite:///ipshield.db"
    key_file: str | None = None  # the owner's master key (watermark); required when watermark=True
    watermark: bool = True
    watermark_dir: str | None = None  # a VLPMarker folder (`ipshield watermark apply`); None = the key's orthogonal start matrices
    device: str = "cpu"
    model_name: str = "ipshield-clip"  # the name reported to clients (never a path)

    # input limits
    max_batch: int = Field(64, ge=1)  # items (images or texts) per request
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=64)  # encoded size of one image
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # width * height, read from the header before decoding
    max_request_pixels: int = Field(256 * 1024 * 1024, ge=1)  # width * height summed over the images of one request
    max_text_chars: int = Field(2000, ge=1)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # whole HTTP body
    body_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)  # seconds a client may take to send the body

    # default per-key limits (each key may override them)
    default_rate: float = Field(20.0, gt=0, allow_inf_nan=False)  # requests per second (token bucket refill)
    default_burst: float | None = Field(None, ge=1, allow_inf_nan=False)  # bucket size (one request = one token); None = max(1, 2 * rate)
    default_quota: int | None = Field(None, ge=0, le=BIGINT_MAX)  # embeddings per key in total; None = unlimited

    # micro-batching
    batching: bool = True
    batch_max_items: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0, allow_inf_nan=False)  # 0: batch only what queued up while the model was busy

    # resources and authentication [ours]
    max_inflight_pixels: int = Field(64 * 1024 * 1024, ge=1)  # decoded pixels in flight in one process (memory bound)
    decode_chunk_pixels: int = Field(4 * 1024 * 1024, ge=1)  # images decoded per worker-thread call, in pixels
    shrink_images_to: int | None = Field(1024, ge=16)  # longer side above this: reduced while decoding (None: never)
    key_cache_s: float = Field(1.0, ge=0, allow_inf_nan=False)  # valid keys cached this long (a revocation's delay)
    auth_failure_limit: int = Field(20, ge=1)  # failed authentications per client address per minute before 429

    # audit log
    audit_window_s: int = Field(60, ge=1)  # width of one audit row
    flush_interval_s: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0 = write usage to the database on every request
    torch_threads: int | None = Field(None, ge=1)

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v:
            raise ValueError("the model is empty: give a CLIP folder or stub")
        m = _STUB_RE.match(v)
        if m and m.group(1) is not None:
            dim = m.group(1)
            if not dim.isdigit() or not 1 <= int(dim) <= STUB_MAX_DIM:
                raise ValueError(f"the stand-in model is stub or stub:DIM with DIM a whole number from 1 to {STUB_MAX_DIM} "
                                 f"(got {v!r})")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE_RE.match(v):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("db")
    @classmethod
    def _check_db(cls, v: str) -> str:
        if not v or "://" not in v:
            raise ValueError("the database URL must look like sqlite:///FILE.db or postgresql+psycopg://USER@HOST/DB")
        return v
