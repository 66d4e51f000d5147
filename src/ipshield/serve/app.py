"""The FastAPI application: ``create_app(settings)``.

Endpoints (all ``/v1`` ones need an API key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``):
- ``GET /health``: liveness, embedding size.
- ``POST /v1/embed/images``: JSON ``{"images": [base64 or data URL, ...]}``.
- ``POST /v1/embed/images/upload``: multipart, one or more ``files`` parts.
- ``POST /v1/embed/texts``: JSON ``{"texts": [...]}``.
- ``POST /v1/embeddings``: OpenAI-style alias (``input``: a string, or a list of strings and
  ``{"image": base64 or data URL}`` / ``{"text": ...}`` objects).
- ``GET /v1/usage``: the caller's own counters and limits.
- ``/docs``, ``/openapi.json``.

Every error is JSON ``{"error": {"code": ..., "message": ...}}``; an unexpected failure is a
generic 500 without internals (the log gets the exception type only, never a traceback, a key,
a matrix or an input).
"""



import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ipshield.serve.backend import CustomerTransform, EmbeddingBackend
from ipshield.serve.batching import MicroBatcher
from ipshield.serve.images import InputError, b64_to_bytes, decode_image, header_pixels
from ipshield.serve.settings import ServeSettings
from ipshield.serve.store import KeyRecord, KeyStore, TokenBuckets, UsageRecorder

log = logging.getLogger("ipshield.serve")
API_VERSION = "1"


# ----------------------------------------------------------------------------- schemas
class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="base64-encoded images (PNG, JPEG, WEBP, BMP, GIF), or data URLs")


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(description="texts to embed")


class Usage(BaseModel):
    images: int
    texts: int


class EmbeddingsResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]]
    usage: Usage


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 or data URL")


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[Union[str, ImageItem, TextItem]]]
    model: str | None = None
    encoding_format: str | None = Field(None, description="only 'float' is supported")


class OpenAIEmbedding(BaseModel):
    object: str = "embedding"
    index: int
    embedding: list[float]


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIResponse(BaseModel):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class UsageResponse(BaseModel):
    customer: str
    used: int
    quota: int | None
    rate: float
    burst: float


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: str
    model: str
    dim: int
    version: str


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422, 429, 500)}


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: from Content-Length before reading, or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                    resp = _error(400, "bad_content_length", "Content-Length is not a number")
                    return await resp(scope, receive, send)
                if too_big:
                    resp = _error(413, "request_too_large", f"request body over {self.max_bytes} bytes")
                    return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return msg

        await self.app(scope, limited, send)


class CatchAllMiddleware:
    """The outermost guard: whatever escapes becomes a generic JSON 500, logged by type only (so no
    traceback reaches the server log and nothing internal reaches the client)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _error(413, "request_too_large", "request body too large")(scope, receive, send)
        except Exception as exc:
            log.error("internal error on %s %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__)
            if not started:
                await _error(500, "internal_error", "internal server error")(scope, receive, send)


# ----------------------------------------------------------------------------- the service
@dataclass
class Caller:
    record: KeyRecord
    rate: float
    burst: float


class Service:
    """What the handlers share: settings, backend, store, limits, audit, batcher."""

    def __init__(self, settings: ServeSettings, backend: EmbeddingBackend, transform: CustomerTransform | None, engine):
        self.settings = settings
        self.backend = backend
        self.transform = transform
        self.engine = engine
        self.store = KeyStore(engine)
        self.buckets = TokenBuckets()
        self.recorder = UsageRecorder(engine, settings.audit_window_s)
        self.batcher = MicroBatcher(backend, transform, enabled=settings.batching,
                                    max_items=settings.batch_max_items, max_wait_ms=settings.batch_max_wait_ms)
        self.model_name = settings.model_name
        self.dim = int(backend.dim)

    def flush(self) -> None:
        try:
            self.recorder.flush()
        except Exception as exc:
            log.error("could not write usage to the database (%s); will retry", type(exc).__name__)


def create_app(settings: ServeSettings | None = None, *, backend: EmbeddingBackend | None = None,
               transform: CustomerTransform | None = None, engine=None) -> FastAPI:
    """The ASGI app. ``backend``/``transform``/``engine`` default to what ``settings`` names (the
    CLIP folder, the master key's per-customer watermark, the database URL)."""
    from ipshield.serve.db import open_db

    settings = settings or ServeSettings()
    if backend is None:
        from ipshield.serve.backend import load_backend

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        backend = load_backend(settings.model, settings.device)
    if transform is None and settings.watermark:
        from ipshield.serve.watermarking import watermark_transform

        transform = watermark_transform(settings.key_file, int(backend.dim), settings.watermark_dir)
    engine = engine if engine is not None else open_db(settings.db)
    svc = Service(settings, backend, transform, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.batcher.start()
        stop = asyncio.Event()

        async def flusher():
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(settings.flush_interval_s, 0.2))
                except (asyncio.TimeoutError, TimeoutError):
                    pass
                await run_in_threadpool(svc.flush)

        task = asyncio.create_task(flusher())
        log.info("serving %s (dim %d), watermark %s, batching %s", svc.model_name, svc.dim,
                 "on" if transform is not None else "off", "on" if settings.batching else "off")
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await task
            await svc.batcher.stop()
            await run_in_threadpool(svc.flush)

    app = FastAPI(
        title="ipshield embedding service",
        version=API_VERSION,
        description="Image and text embeddings of a CLIP-style model, per API key. Errors are JSON "
        '`{"error": {"code", "message"}}`.',
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(CatchAllMiddleware)

    # ---- error handlers
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, _BodyTooLarge):
            return _error(413, "request_too_large", "request body too large")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return _error(exc.status_code, f"http_{exc.status_code}", detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error(500, "internal_error", "internal server error")

    # ---- dependencies
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer API_KEY")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: API_KEY")

    def authenticate(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                     xkey: Annotated[str | None, Depends(header_key)]) -> Caller:
        raw = cred.credentials if cred is not None else xkey
        if not raw:
            raise ApiError(401, "missing_api_key", "no API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                           {"WWW-Authenticate": "Bearer"})
        rec = svc.store.lookup(raw.strip())
        if rec is None:
            raise ApiError(401, "invalid_api_key", "the API key is not valid", {"WWW-Authenticate": "Bearer"})
        if rec.revoked:
            svc.recorder.reject(rec.key_id)
            raise ApiError(401, "revoked_api_key", "the API key was revoked", {"WWW-Authenticate": "Bearer"})
        rate = rec.rate if rec.rate is not None else settings.default_rate
        burst = rec.burst if rec.burst is not None else (settings.default_burst or max(1.0, 2.0 * rate))
        wait = svc.buckets.take(rec.key_id, rate, burst)
        if wait > 0:
            svc.recorder.reject(rec.key_id)
            raise ApiError(429, "rate_limited", f"over the rate limit of {rate:g} requests/s; retry in {wait:.2f} s",
                           {"Retry-After": str(max(1, int(np.ceil(wait))))})
        return Caller(rec, rate, burst)

    def content_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    async def json_only(request: Request) -> None:
        if content_type(request) != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")

    async def multipart_only(request: Request) -> None:
        if content_type(request) != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data 'files' parts")

    # ---- helpers
    def check_batch(n: int, what: str) -> None:
        if n == 0:
            raise ApiError(422, "empty_batch", f"no {what} given: send at least one")
        if n > settings.max_batch:
            raise ApiError(413, "batch_too_large", f"{n} {what} in one request, the limit is {settings.max_batch}")

    def check_texts(texts: list[str]) -> None:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ApiError(422, "bad_text", f"text {i} is not a string")
            if len(t) > settings.max_text_chars:
                raise ApiError(413, "text_too_long", f"text {i}: {len(t)} characters, the limit is {settings.max_text_chars}")
            if "\x00" in t:
                raise ApiError(422, "bad_text", f"text {i} contains a NUL character")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(422, "bad_text", f"text {i} is not valid Unicode (lone surrogate)") from None

    def decode_all(raws: list[bytes]) -> list[np.ndarray]:
        return [decode_image(r, settings.max_image_bytes, settings.max_image_pixels, i) for i, r in enumerate(raws)]

    async def decode(raws: list[bytes]) -> list[np.ndarray]:
        # small images are decoded in the event loop (a thread hop costs more than the decoding);
        # the header says how big they are before anything is decoded
        if header_pixels(raws) <= 128 * 128 * 4:
            return decode_all(raws)
        return await run_in_threadpool(decode_all, raws)

    def hashes(items: list[bytes]) -> list[bytes]:
        return [hashlib.blake2b(x, digest_size=16).digest() for x in items]

    async def embed(caller: Caller, kind: str, items: list, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        rec = caller.record
        if not svc.recorder.try_reserve(rec.key_id, len(items), rec.used, rec.quota):
            svc.recorder.reject(rec.key_id)
            raise ApiError(429, "quota_exceeded", f"the key's quota of {rec.quota} embeddings is used up")
        if hasattr(svc.transform, "matrix") and not svc.transform.cached(rec.customer):
            # derive a new customer's matrix off the model thread (once; then it is cached)
            await run_in_threadpool(svc.transform.matrix, rec.customer)
        clean, served = await svc.batcher.embed(kind, items, rec.customer)
        if not np.all(np.isfinite(served)):
            raise RuntimeError("non-finite embedding")
        svc.recorder.record(rec.key_id, len(items) if kind == "image" else 0, len(items) if kind == "text" else 0, keys, clean)
        if settings.flush_interval_s == 0:
            await run_in_threadpool(svc.flush)
        return clean, served

    def response(served: np.ndarray, n_images: int, n_texts: int) -> JSONResponse:
        return JSONResponse({"model": svc.model_name, "dim": svc.dim, "embeddings": served.tolist(),
                             "usage": {"images": n_images, "texts": n_texts}})

    # ---- routes
    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health():
        return {"status": "ok", "model": svc.model_name, "dim": svc.dim, "version": API_VERSION}

    @app.post("/v1/embed/images", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_images(body: ImagesRequest, caller: Annotated[Caller, Depends(authenticate)],
                           _ct: Annotated[None, Depends(json_only)]):
        check_batch(len(body.images), "images")
        raws = [b64_to_bytes(s, settings.max_image_bytes, i) for i, s in enumerate(body.images)]
        images = await decode(raws)
        _, served = await embed(caller, "image", images, hashes(raws))
        return response(served, len(images), 0)

    @app.post("/v1/embed/images/upload", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_upload(caller: Annotated[Caller, Depends(authenticate)], _ct: Annotated[None, Depends(multipart_only)],
                           files: Annotated[list[UploadFile], File(description="image files")]):
        check_batch(len(files), "images")
        raws = []
        for i, f in enumerate(files):
            data = await f.read(settings.max_image_bytes + 1)
            if len(data) > settings.max_image_bytes:
                raise InputError(413, "image_too_large", f"image {i}: more than {settings.max_image_bytes} bytes")
            raws.append(data)
        images = await decode(raws)
        _, served = await embed(caller, "image", images, hashes(raws))
        return response(served, len(images), 0)

    @app.post("/v1/embed/texts", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_texts(body: TextsRequest, caller: Annotated[Caller, Depends(authenticate)],
                          _ct: Annotated[None, Depends(json_only)]):
        check_batch(len(body.texts), "texts")
        check_texts(body.texts)
        _, served = await embed(caller, "text", list(body.texts), hashes([t.encode("utf-8") for t in body.texts]))
        return response(served, 0, len(body.texts))

    @app.post("/v1/embeddings", response_model=OpenAIResponse, responses=ERRORS, tags=["embeddings"])
    async def openai_embeddings(body: OpenAIRequest, caller: Annotated[Caller, Depends(authenticate)],
                                _ct: Annotated[None, Depends(json_only)]):
        if body.encoding_format not in (None, "float"):
            raise ApiError(422, "bad_encoding_format", "only encoding_format 'float' is supported")
        items: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        check_batch(len(items), "inputs")
        text_pos, texts, img_pos, raws = [], [], [], []
        for i, it in enumerate(items):
            if isinstance(it, ImageItem):
                img_pos.append(i)
                raws.append(b64_to_bytes(it.image, settings.max_image_bytes, i))
            else:
                text_pos.append(i)
                texts.append(it.text if isinstance(it, TextItem) else it)
        check_texts(texts)
        out = np.zeros((len(items), svc.dim), dtype=np.float32)
        if raws:
            images = await decode(raws)
            _, served = await embed(caller, "image", images, hashes(raws))
            out[img_pos] = served
        if texts:
            _, served = await embed(caller, "text", texts, hashes([t.encode("utf-8") for t in texts]))
            out[text_pos] = served
        n_tokens = sum(len(t.split()) for t in texts) + len(raws)
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(out.tolist())],
            "model": svc.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        })

    @app.get("/v1/usage", response_model=UsageResponse, responses=ERRORS, tags=["service"])
    async def my_usage(caller: Annotated[Caller, Depends(authenticate)]):
        rec = caller.record
        used = svc.recorder._total.get(rec.key_id, rec.used + svc.recorder.pending_used(rec.key_id))
        return {"customer": rec.customer, "used": int(used), "quota": rec.quota, "rate": caller.rate, "burst": caller.burst}

    return app
