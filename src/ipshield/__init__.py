"""ipshield: intellectual-property protection for vision-language models.

Domain restriction (IP-CLIP, MAP, NTL, CUTI-domain), embedding-service watermarks (VLPMarker,
EmbMarker), the attacks that try to break them, metrics, benchmarks and an embedding service.
"""

__version__ = "0.1.0"

from ipshield.errors import IPShieldError  # noqa: E402

__all__ = ["IPShieldError", "__version__"]
