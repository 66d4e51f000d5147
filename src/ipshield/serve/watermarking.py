"""The per-customer watermark transform the service applies: ``normalise(e @ W_customer)``.

- With a watermark folder (``ipshield watermark apply``) and its master key: ``W_customer`` is
  VLPMarker's trigger-aligned matrix (``load_watermark(folder, key).matrix(customer)``), the one
  ``ipshield verify`` tests for.
- With the master key alone: the customer's exactly orthogonal start matrix
  (``MasterKey.customer_start``); it identifies the customer through the distribution test but
  carries no trigger alignment (serve with a watermark folder for the full VLPMarker).

Matrices are computed on first use and cached in memory only; neither the key nor a matrix is ever
written to the database, a response or a log line.
"""

from __future__ import annotations

import numpy as np

from ipshield.errors import IPShieldError
from ipshield.serve.backend import MatrixTransform


def watermark_transform(key_file: str | None, dim: int, watermark_dir: str | None = None) -> MatrixTransform:
    if not key_file:
        raise IPShieldError("the watermark is on but no master key was given",
                            "pass --key-file master_key.json (from `ipshield watermark keygen`), or --no-watermark")
    from ipshield.watermark.keys import MasterKey

    key = MasterKey.load(key_file, dim=dim)
    if watermark_dir:
        from ipshield.watermark.base import load_watermark

        wm = load_watermark(watermark_dir, key)
        if getattr(wm, "scheme", None) != "vlpmarker":
            # embmarker and vlpmarker+embmarker also change texts by their words, which this
            # matrix-only service does not do: serving them here would silently drop that layer
            raise IPShieldError(f"the watermark in {watermark_dir} is not a linear transform (scheme {getattr(wm, 'scheme', '?')})",
                                "serve a VLPMarker watermark folder (`ipshield watermark apply --scheme vlpmarker`)")

        def matrix_for(customer_id: str) -> np.ndarray:
            return wm.matrix(customer_id).float().numpy()
    else:
        def matrix_for(customer_id: str) -> np.ndarray:
            return key.customer_start(customer_id).float().numpy()

    return MatrixTransform(matrix_for)
