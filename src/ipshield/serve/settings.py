"""Settings of the embedding service (one validated object; the CLI builds it from its options)."""

from __future__ import annotations

from pydantic import Field

from ipshield.config import BaseConfig


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
    max_text_chars: int = Field(2000, ge=1)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # whole HTTP body

    # default per-key limits (each key may override them)
    default_rate: float = Field(20.0, gt=0)  # requests per second (token bucket refill)
    default_burst: float | None = None  # bucket size; None = max(1, 2 * rate)
    default_quota: int | None = Field(None, ge=0)  # embeddings per key in total; None = unlimited

    # micro-batching
    batching: bool = True
    batch_max_items: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0)  # 0: batch only what queued up while the model was busy

    # audit log
    audit_window_s: int = Field(60, ge=1)  # width of one audit row
    flush_interval_s: float = Field(1.0, ge=0)  # 0 = write usage to the database on every request
    torch_threads: int | None = None
