"""The bare-framework floor of the load benchmark: the same backend behind a plain FastAPI app.

``python -m ipshield.serve.floor --model DIR|stub --port P --threads T`` serves

- ``POST /v1/embed/images``: JSON ``{"images": [base64 PNG, ...]}`` -> ``{"embeddings": [[...], ...]}``
  (base64 decode, PIL decode to RGB uint8, ``load_backend(model).embed_images``),
- ``POST /v1/embed/texts``: JSON ``{"texts": [...]}`` (so that ``bench serve --kind text`` has a floor too),
- ``GET /health``: readiness, for the benchmark's start-up poll,

with no authentication, no limits, no audit, no watermark and no micro-batching, on uvicorn with
the access log off. The model runs inline in the event loop (no thread hop): the least CPU a
FastAPI server can spend per request with this backend. ``ipshield bench serve`` measures it in the
same interleaved rounds as the ipshield configurations and reports CPU-per-request ratios against
it. It is a measuring stick, not a service: it listens on loopback by default and checks nothing.
"""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
from pydantic import BaseModel


class ImagesRequest(BaseModel):
    images: list[str]


class TextsRequest(BaseModel):
    texts: list[str]


def create_floor_app(backend):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from PIL import Image

    app = FastAPI(title="ipshield bare-framework floor", docs_url=None, redoc_url=None, openapi_url=None)
    dim = int(backend.dim)

    @app.get("/health")
    async def health():
        return {"status": "ok", "dim": dim}

    @app.post("/v1/embed/images")
    async def embed_images(body: ImagesRequest):
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"), dtype=np.uint8) for s in body.images]
        out = np.asarray(backend.embed_images(images), dtype=np.float32)
        return JSONResponse({"embeddings": out.tolist()})

    @app.post("/v1/embed/texts")
    async def embed_texts(body: TextsRequest):
        out = np.asarray(backend.embed_texts(list(body.texts)), dtype=np.float32)
        return JSONResponse({"embeddings": out.tolist()})

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ipshield.serve.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="CLIP folder, or stub[:DIM]")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import uvicorn

    from ipshield.serve.backend import load_backend

    if args.threads and not args.model.startswith("stub"):
        import torch

        torch.set_num_threads(args.threads)
    app = create_floor_app(load_backend(args.model, args.device))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
