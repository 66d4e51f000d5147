"""The FastAPI application: ``create_app(settings)``.

Endpoints (all ``/v1`` ones need an API key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``):
- ``GET /health``: liveness, embedding size.
- ``POST /v1/embed/images``: JSON ``{"images": [base64 or data URL, ...]}``.
- ``POST /v1/embed/images/upload``: multipart, one or more ``files`` parts.
- ``POST /v1/embed/texts``: JSON ``{"texts": [...]}``.
- ``POST /v1/embeddings``: OpenAI-style alias (``input``: a string, or a list of strings and
  ``{"image": base64 or data URL}`` / ``{"text": ...}`` objects).
- ``GET /v1/usage``: the caller's own counters and limits.
- ``GET /metrics``: Prometheus metrics (an admin key), ``/admin``: the owner's page (an admin key).
- ``/docs``, ``/openapi.json``.

The order of work for every request under ``/v1``, ``/admin`` and ``/metrics`` [ours]: the client
address's failed-authentication throttle, the key (from the headers only), the rate limit (in the
database, exact across processes), then the body, read with a size limit and a deadline; only
then does anything parse it. Images are decoded off the event loop under a per-request and a
per-process pixel budget. A request is charged (quota and audit, one transaction) after its
embeddings are computed and before they are sent; a request that fails is not charged.

Every error is JSON ``{"error": {"code": ..., "message": ...}}``; an unexpected failure is a
generic 500 without internals (the log gets the exception type only, never a traceback, a key,
a matrix or an input). Validation messages name neither unknown fields nor values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ipshield.serve.backend import CustomerTransform, EmbeddingBackend
from ipshield.serve.batching import MicroBatcher
from ipshield.serve.images import InputError, b64_to_bytes, decode_image, image_pixels
from ipshield.serve.settings import ServeSettings
from ipshield.serve.store import FailureLimiter, KeyCache, KeyRecord, KeyStore, Ledger, UsageRecorder, key_id_of

log = logging.getLogger("ipshield.serve")
API_VERSION = "1"
GATED = ("/v1/", "/admin", "/metrics")  # path prefixes that need a key before anything else
ADMIN_ONLY = ("/admin", "/metrics")
_JSON_OFFLOOP = 256 * 1024  # bodies over this are parsed in a worker thread
_SMALL_REQUEST_PIXELS = 1024 * 1024  # requests up to this are decoded in one worker-thread call, outside the budget
_BODY_TYPES = {  # what each POST route reads: checked before the body is
    "/v1/embed/images": ("application/json", "send the body as application/json"),
    "/v1/embed/texts": ("application/json", "send the body as application/json"),
    "/v1/embeddings": ("application/json", "send the body as application/json"),
    "/v1/embed/images/upload": ("multipart/form-data", "send the images as multipart/form-data 'files' parts"),
}


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


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 408, 413, 415, 422, 429, 500, 503)}
_FIELDS = {"images", "texts", "input", "image", "text", "model", "encoding_format", "files", "body"}


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> str:
    """What is wrong with a body, without echoing it: only known field names and list positions
    appear; an unknown field is "an unknown field" (its name could be a secret someone pasted)."""
    parts = []
    for e in errors[:5]:
        if e.get("type") == "extra_forbidden":
            parts.append("the body has an unknown field (see /docs for the request's fields)")
            continue
        loc = [str(x) for x in e.get("loc", ()) if isinstance(x, int) or (isinstance(x, str) and x in _FIELDS and x != "body")]
        kind = str(e.get("type", "invalid"))
        msg = {"missing": "is required", "json_invalid": "is not valid JSON", "string_type": "should be a string",
               "list_type": "should be a list", "model_attributes_type": "should be an object",
               "union_tag_invalid": "has the wrong type"}.get(kind, "is invalid" if "type" not in kind else "has the wrong type")
        parts.append(f"{'.'.join(loc) or 'the body'} {msg}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


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


class PixelBudget:
    """Decoded pixels in flight in this process, at most ``capacity``; a request waits for its
    share up to ``timeout`` seconds, then gets 503 (memory stays bounded whatever the load)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.free = int(capacity)
        self._cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, n: int, timeout: float):
        n = min(int(n), self.capacity)
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.free >= n), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise ApiError(503, "server_busy", "the server is decoding too many images right now; retry shortly",
                               {"Retry-After": "1"}) from None
            self.free -= n
        try:
            yield
        finally:
            async with self._cond:
                self.free += n
                self._cond.notify_all()


class Service:
    """What the handlers share: settings, backend, key store and caches, limits, ledger, audit,
    batcher, metrics."""

    def __init__(self, settings: ServeSettings, backend: EmbeddingBackend, transform: CustomerTransform | None, engine):
        from ipshield.serve.metrics import ServiceMetrics

        self.settings = settings
        self.backend = backend
        self.transform = transform
        self.engine = engine
        self.store = KeyStore(engine)
        self.keys = KeyCache(self.store, settings.key_cache_s)
        self.failures = FailureLimiter(settings.auth_failure_limit, 60.0)
        self.ledger = Ledger(engine, settings.audit_window_s)
        self.recorder = UsageRecorder(engine, settings.audit_window_s)
        self.metrics = ServiceMetrics()
        self.batcher = MicroBatcher(backend, transform, enabled=settings.batching,
                                    max_items=settings.batch_max_items, max_wait_ms=settings.batch_max_wait_ms,
                                    on_batch=self.metrics.observe_batch)
        self.pixels = PixelBudget(settings.max_inflight_pixels)
        self.model_name = settings.model_name
        self.dim = int(backend.dim)

    def flush(self) -> None:
        try:
            self.recorder.flush()
        except Exception as exc:
            log.error("could not write usage to the database (%s); will retry", type(exc).__name__)

    def admit(self, raw: str, admin_only: bool) -> tuple[KeyRecord | None, str | None, float]:
        """(record, None, seconds to wait for the rate limit) for a valid key; (None, key id, 0)
        for a wrong secret with an existing key id; (None, None, 0) otherwise. The rate is
        taken only from a valid, unrevoked key allowed on the path."""
        rec = self.keys.lookup(raw)
        if rec is None:
            kid = key_id_of(raw)
            return None, (kid if kid is not None and self.store.get(kid) is not None else None), 0.0
        if rec.revoked or (admin_only and not rec.admin):
            return rec, None, 0.0
        rate, burst = self.limits(rec)
        return rec, None, self.store.take_rate(rec.key_id, rate, burst)

    def limits(self, rec: KeyRecord) -> tuple[float, float]:
        s = self.settings
        rate = rec.rate if rec.rate is not None else s.default_rate
        burst = rec.burst if rec.burst is not None else (s.default_burst or max(1.0, 2.0 * rate))
        return float(rate), float(burst)


# ----------------------------------------------------------------------------- the gate
class _Stop(Exception):
    def __init__(self, response: JSONResponse | None):
        self.response = response


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            try:
                return v.decode("latin-1")
            except Exception:
                return None
    return None


class Gate:
    """Authentication, the rate limit and a bounded, deadline-bound body read, before the app sees
    the request (so an unauthenticated client costs a header lookup, never a body)."""

    def __init__(self, app, svc: Service):
        self.app, self.svc = app, svc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(GATED):
            return await self.app(scope, receive, send)
        try:
            caller = await self._authenticate(scope)
            want = _BODY_TYPES.get(scope["path"]) if scope.get("method") == "POST" else None
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if want is not None and ctype != want[0]:
                raise _Stop(_error(415, "unsupported_media_type", want[1]))
            body = await self._read_body(scope, receive)
        except _Stop as stop:
            if stop.response is not None:
                await stop.response(scope, receive, send)
            return
        scope["ipshield.caller"] = caller
        if ctype == "application/json" and len(body) > _JSON_OFFLOOP:
            try:
                scope["ipshield.json"] = await run_in_threadpool(json.loads, body)
            except ValueError:
                pass  # FastAPI reports invalid JSON itself
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _authenticate(self, scope) -> Caller:
        svc = self.svc
        addr = (scope.get("client") or ("?", 0))[0]
        wait = svc.failures.retry_after(addr)
        if wait > 0:
            svc.metrics.rejected(None, "auth")
            raise _Stop(_error(429, "too_many_auth_failures",
                               f"too many failed authentications from this address; retry in {int(np.ceil(wait))} s",
                               {"Retry-After": str(max(1, int(np.ceil(wait))))}))
        auth = _header(scope, b"authorization")
        raw = None
        if auth and auth[:7].lower() == "bearer ":
            raw = auth[7:].strip()
        if not raw:
            raw = (_header(scope, b"x-api-key") or "").strip()
        if not raw:
            raise _Stop(_error(401, "missing_api_key", "no API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                               {"WWW-Authenticate": "Bearer"}))
        try:  # one trip off the event loop: the key (cached for a second) and the shared rate limit
            rec, known, wait = await run_in_threadpool(svc.admit, raw, scope["path"].startswith(ADMIN_ONLY))
        except Exception as exc:
            log.error("key lookup or rate limiter failed: %s", type(exc).__name__)
            raise _Stop(_error(503, "storage_unavailable", "the key store is not reachable; retry shortly",
                               {"Retry-After": "1"})) from None
        if rec is None:
            svc.failures.fail(addr)
            if known is not None:  # a well-formed key of an existing id with a wrong secret: audited
                svc.recorder.auth_failure(known)
            svc.metrics.rejected(None, "auth")
            raise _Stop(_error(401, "invalid_api_key", "the API key is not valid", {"WWW-Authenticate": "Bearer"}))
        if rec.revoked:
            svc.recorder.reject(rec.key_id)
            svc.metrics.rejected(rec.customer, "auth")
            raise _Stop(_error(401, "revoked_api_key", "the API key was revoked", {"WWW-Authenticate": "Bearer"}))
        if scope["path"].startswith(ADMIN_ONLY) and not rec.admin:
            raise _Stop(_error(403, "admin_only", "this page needs an owner key (`ipshield keys create --admin`)"))
        rate, burst = svc.limits(rec)
        if wait > 0:
            svc.recorder.reject(rec.key_id)
            svc.metrics.rejected(rec.customer, "rate")
            raise _Stop(_error(429, "rate_limited", f"over the rate limit of {rate:g} requests/s; retry in {wait:.2f} s",
                               {"Retry-After": str(max(1, int(np.ceil(wait))))}))
        return Caller(rec, rate, burst)

    async def _read_body(self, scope, receive) -> bytes:
        s = self.svc.settings
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise _Stop(_error(400, "bad_content_length", "Content-Length is not a number")) from None
            if n > s.max_request_bytes:
                raise _Stop(_error(413, "request_too_large", f"request body over {s.max_request_bytes} bytes"))
        chunks, seen = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.body_timeout_s
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), left)
            except (asyncio.TimeoutError, TimeoutError):
                raise _Stop(_error(408, "body_timeout", f"the request body did not arrive within {s.body_timeout_s:g} s",
                                   {"Connection": "close"})) from None
            if msg["type"] == "http.disconnect":
                raise _Stop(None)
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > s.max_request_bytes:
                raise _Stop(_error(413, "request_too_large", f"request body over {s.max_request_bytes} bytes", {"Connection": "close"}))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


class _GatedRequest(Request):
    async def json(self) -> Any:
        if "ipshield.json" in self.scope:
            return self.scope["ipshield.json"]
        return await super().json()


class _Route(APIRoute):
    """Routes whose JSON body may already have been parsed off the event loop by the gate."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def gated(request: Request):
            return await handler(_GatedRequest(request.scope, request.receive))

        return gated


# ----------------------------------------------------------------------------- the app
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
        _quiet_loop_errors(asyncio.get_running_loop())
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
    app.router.route_class = _Route
    app.state.service = svc
    from ipshield.serve.metrics import MetricsMiddleware

    app.add_middleware(Gate, svc=svc)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    app.add_middleware(CatchAllMiddleware)

    # ---- error handlers
    def count_input_error(request: Request, status: int) -> None:
        caller = request.scope.get("ipshield.caller")
        if caller is not None and 400 <= status < 500 and status != 429:
            svc.metrics.rejected(caller.record.customer, "input")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        count_input_error(request, exc.status)
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        count_input_error(request, exc.status)
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _error(422, "invalid_request", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return _error(exc.status_code, f"http_{exc.status_code}", detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error(500, "internal_error", "internal server error")

    # ---- helpers
    def caller_of(request: Request) -> Caller:
        return request.scope["ipshield.caller"]

    def content_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    def json_only(request: Request) -> None:
        if content_type(request) != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")

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

    def sizes(raws: list[bytes]) -> list[int]:
        px = []
        for i, r in enumerate(raws):
            if len(r) > settings.max_image_bytes:
                raise InputError(413, "image_too_large", f"image {i}: {len(r)} bytes, the limit is {settings.max_image_bytes}")
            if not r:
                raise InputError(400, "bad_image", f"image {i}: empty")
            n = image_pixels(r, i)
            if n > settings.max_image_pixels:
                raise InputError(413, "image_too_many_pixels", f"image {i}: {n} pixels, the limit is {settings.max_image_pixels} pixels")
            px.append(n)
        total = sum(px)
        if total > settings.max_request_pixels:
            raise InputError(413, "request_too_many_pixels",
                             f"the images hold {total} pixels in all, the limit is {settings.max_request_pixels} per request: "
                             "send fewer or smaller images")
        return px

    def decode_some(raws: list[bytes], first: int) -> list[np.ndarray]:
        return [decode_image(r, settings.max_image_bytes, settings.max_image_pixels, first + i, settings.shrink_images_to)
                for i, r in enumerate(raws)]

    def small_or_sizes(strings: list[str] | None, raws: list[bytes] | None):
        """In a worker thread: base64 (when given strings), header sizes, and, when the request is
        small (at most 1 Mpx in all), the decoding too, in one trip off the event loop."""
        if raws is None:
            raws = b64_all(strings)
        px = sizes(raws)
        if sum(px) <= _SMALL_REQUEST_PIXELS:
            return raws, px, decode_some(raws, 0)
        return raws, px, None

    async def decode_images(strings: list[str] | None = None, raws: list[bytes] | None = None):
        """(raw bytes, decoded arrays), all off the event loop. Large requests are decoded in
        chunks that each hold their pixels of the process's budget while they are decoded (large
        images are shrunk inside ``decode_image``)."""
        raws, px, images = await run_in_threadpool(small_or_sizes, strings, raws)
        if images is None:
            images = await decode(raws, px)
        return raws, images

    async def decode(raws: list[bytes], px: list[int]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        i = 0
        while i < len(raws):
            j, held = i + 1, px[i]
            while j < len(raws) and held + px[j] <= settings.decode_chunk_pixels:
                held += px[j]
                j += 1
            async with svc.pixels.hold(held, settings.body_timeout_s):
                out += await run_in_threadpool(decode_some, raws[i:j], i)
            i = j
        return out

    def hashes(items: list[bytes]) -> list[bytes]:
        return [hashlib.blake2b(x, digest_size=16).digest() for x in items]

    def quota_of(rec: KeyRecord) -> int | None:
        return rec.quota if rec.quota is not None else settings.default_quota

    async def serve(caller: Caller, parts: list[tuple[str, list, list[bytes]]]) -> list[np.ndarray]:
        """Embed every part, then charge the request once (all its items) and audit it; the
        served rows of each part."""
        rec = caller.record
        n_img = sum(len(items) for kind, items, _ in parts if kind == "image")
        n_txt = sum(len(items) for kind, items, _ in parts if kind == "text")
        quota = quota_of(rec)
        if quota is not None and rec.used + n_img + n_txt > quota:  # ``used`` only grows: a safe early no
            svc.recorder.reject(rec.key_id)
            svc.metrics.rejected(rec.customer, "quota")
            raise ApiError(429, "quota_exceeded", f"the key's quota of {quota} embeddings is used up")
        tr = svc.transform
        if tr is not None and hasattr(tr, "prepare") and not tr.cached(rec.customer):
            await run_in_threadpool(tr.prepare, rec.customer)  # derive a new customer's watermark once
        results = []
        for kind, items, _ in parts:
            clean, served = await svc.batcher.embed(kind, items, rec.customer)
            if not np.all(np.isfinite(served)):
                raise RuntimeError("non-finite embedding")
            results.append((clean, served))
        try:
            ok = await run_in_threadpool(svc.ledger.charge, rec.key_id, n_img, n_txt, settings.default_quota)
        except Exception as exc:
            log.error("could not charge a request (%s): not served", type(exc).__name__)
            raise ApiError(503, "storage_unavailable", "usage could not be recorded, so nothing was served or charged; retry shortly",
                           {"Retry-After": "1"}) from None
        if not ok:
            svc.recorder.reject(rec.key_id)
            svc.metrics.rejected(rec.customer, "quota")
            raise ApiError(429, "quota_exceeded", f"the key's quota of {quota} embeddings is used up")
        for (kind, items, keys), (clean, _) in zip(parts, results):
            svc.recorder.record(rec.key_id, keys, clean)
        svc.metrics.served(rec.customer, n_img + n_txt)
        if settings.flush_interval_s == 0:
            await run_in_threadpool(svc.flush)
        return [served for _, served in results]

    def response(served: np.ndarray, n_images: int, n_texts: int) -> JSONResponse:
        return JSONResponse({"model": svc.model_name, "dim": svc.dim, "embeddings": served.tolist(),
                             "usage": {"images": n_images, "texts": n_texts}})

    def b64_all(strings: list[str]) -> list[bytes]:
        return [b64_to_bytes(s, settings.max_image_bytes, i) for i, s in enumerate(strings)]

    # ---- routes
    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health():
        return {"status": "ok", "model": svc.model_name, "dim": svc.dim, "version": API_VERSION}

    @app.post("/v1/embed/images", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_images(body: ImagesRequest, request: Request):
        json_only(request)
        check_batch(len(body.images), "images")
        raws, images = await decode_images(strings=body.images)
        (served,) = await serve(caller_of(request), [("image", images, hashes(raws))])
        return response(served, len(images), 0)

    @app.post("/v1/embed/images/upload", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_upload(request: Request, files: list[UploadFile] = File(description="image files")):
        if content_type(request) != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data 'files' parts")
        check_batch(len(files), "images")
        raws = []
        for i, f in enumerate(files):
            data = await f.read(settings.max_image_bytes + 1)
            if len(data) > settings.max_image_bytes:
                raise InputError(413, "image_too_large", f"image {i}: more than {settings.max_image_bytes} bytes")
            raws.append(data)
        raws, images = await decode_images(raws=raws)
        (served,) = await serve(caller_of(request), [("image", images, hashes(raws))])
        return response(served, len(images), 0)

    @app.post("/v1/embed/texts", response_model=EmbeddingsResponse, responses=ERRORS, tags=["embeddings"])
    async def embed_texts(body: TextsRequest, request: Request):
        json_only(request)
        check_batch(len(body.texts), "texts")
        check_texts(body.texts)
        texts = list(body.texts)
        (served,) = await serve(caller_of(request), [("text", texts, hashes([t.encode("utf-8") for t in texts]))])
        return response(served, 0, len(texts))

    @app.post("/v1/embeddings", response_model=OpenAIResponse, responses=ERRORS, tags=["embeddings"])
    async def openai_embeddings(body: OpenAIRequest, request: Request):
        json_only(request)
        if body.encoding_format not in (None, "float"):
            raise ApiError(422, "bad_encoding_format", "only encoding_format 'float' is supported")
        items: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        check_batch(len(items), "inputs")
        text_pos, texts, img_pos, strings = [], [], [], []
        for i, it in enumerate(items):
            if isinstance(it, ImageItem):
                img_pos.append(i)
                strings.append(it.image)
            else:
                text_pos.append(i)
                texts.append(it.text if isinstance(it, TextItem) else it)
        check_texts(texts)
        parts = []
        raws: list[bytes] = []
        if strings:
            raws, images = await decode_images(strings=strings)
            parts.append(("image", images, hashes(raws)))
        if texts:
            parts.append(("text", texts, hashes([t.encode("utf-8") for t in texts])))
        served = await serve(caller_of(request), parts)
        out = np.zeros((len(items), svc.dim), dtype=np.float32)
        k = 0
        if strings:
            out[img_pos] = served[k]
            k += 1
        if texts:
            out[text_pos] = served[k]
        n_tokens = sum(len(t.split()) for t in texts) + len(raws)
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(out.tolist())],
            "model": svc.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        })

    @app.get("/v1/usage", response_model=UsageResponse, responses=ERRORS, tags=["service"])
    async def my_usage(request: Request):
        caller = caller_of(request)
        rec = caller.record
        used = await run_in_threadpool(svc.ledger.used, rec.key_id)
        return {"customer": rec.customer, "used": used, "quota": quota_of(rec), "rate": caller.rate, "burst": caller.burst}

    @app.get("/metrics", tags=["service"], responses=ERRORS)
    async def metrics():
        from starlette.responses import Response

        from ipshield.serve.monitor import report

        try:
            reps = await run_in_threadpool(report, engine)
            svc.metrics.set_flags(reps)
        except Exception as exc:  # the counters are still worth serving
            log.error("extraction monitor failed: %s", type(exc).__name__)
        data, ctype = svc.metrics.render()
        return Response(content=data, media_type=ctype)

    try:
        from ipshield.serve.admin import install_admin
    except ModuleNotFoundError:  # pragma: no cover
        install_admin = None
    if install_admin is not None:
        install_admin(app, svc)
    return app


_last_loop_error = [0.0]


def _quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a full traceback for every failed accept() ("Too many open files" under a
    flood of connections); one line at most every 5 s instead, with what to do."""

    def handler(loop, context):
        now = time.monotonic()
        if now - _last_loop_error[0] < 5.0:
            return
        _last_loop_error[0] = now
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else (type(exc).__name__ if exc else "")
        log.error("event loop: %s %s%s", context.get("message", "error"), what,
                  " (raise the open-files limit, `ulimit -n`, or put a proxy in front)" if isinstance(exc, OSError) else "")

    loop.set_exception_handler(handler)
