"""The per-customer watermark the service applies (``serve.backend.CustomerTransform``).

- With a watermark folder (``ipshield watermark apply``, any scheme registered in ``WATERMARKS``)
  and its master key: the folder is loaded with ``load_watermark(folder, key)`` and served through
  the scheme's own code. A scheme whose registry entry declares no text layer
  (``SchemeSpec.needs_texts`` false: VLPMarker) is a per-customer linear map
  (``watermark.transform(customer)``, the matrix ``ipshield verify`` tests for), served by
  ``MatrixTransform`` (one matmul per customer per batch). A scheme with a text layer (EmbMarker,
  ``vlpmarker+embmarker``) is served by ``SchemeTransform`` through ``watermark.postprocessors
  (customer)``: the texts of each request reach the text layer (trigger words), so the service
  serves what ``watermark.encoder(adapter, customer)`` gives.
- With the master key alone: the customer's exactly orthogonal start matrix
  (``MasterKey.customer_start``); it identifies the customer through the distribution test but
  carries no trigger alignment (serve with a watermark folder for the full VLPMarker).

Per-customer parts are derived on first use (``prepare``) and cached in memory only; neither the
key nor a matrix nor a trigger word is ever written to the database, a response or a log line.
"""

from __future__ import annotations

import numpy as np

from ipshield.errors import IPShieldError
from ipshield.serve.backend import CustomerTransform, MatrixTransform, SchemeTransform


def scheme_transform(watermark) -> CustomerTransform:
    """The service's transform for a loaded watermark of any registered scheme (looked up in
    ``WATERMARKS`` by the object's ``scheme``)."""
    from ipshield.registry import WATERMARKS

    spec = WATERMARKS.get(getattr(watermark, "scheme", "?"))
    if spec.needs_texts:
        return SchemeTransform(watermark)

    def matrix_for(customer_id: str) -> np.ndarray:
        w = watermark.transform(customer_id)
        if w is None:  # not a linear map after all: let the scheme's own functions serve it
            raise IPShieldError(f"the '{spec.name}' watermark gives no linear transform for a customer",
                                "register the scheme with needs_texts=True (it is then served through its postprocessors)")
        return w.float().numpy()

    return MatrixTransform(matrix_for)


def watermark_transform(key_file: str | None, dim: int, watermark_dir: str | None = None) -> CustomerTransform:
    if not key_file:
        raise IPShieldError("the watermark is on but no master key was given",
                            "pass --key-file master_key.json (from `ipshield watermark keygen`), or --no-watermark")
    from ipshield.watermark.keys import MasterKey

    key = MasterKey.load(key_file, dim=dim)
    if watermark_dir:
        from ipshield.watermark.base import load_watermark

        return scheme_transform(load_watermark(watermark_dir, key))

    def matrix_for(customer_id: str) -> np.ndarray:
        return key.customer_start(customer_id).float().numpy()

    return MatrixTransform(matrix_for)
