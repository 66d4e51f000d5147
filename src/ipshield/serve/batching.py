"""Micro-batching: concurrent requests of the same kind (images or texts) share one forward pass.

One worker per kind takes the first waiting request, then everything else already queued (and,
for at most ``max_wait_ms``, what arrives next) up to ``max_items`` items, runs the backend once in
the model thread, and hands each request its rows after that request's customer transform (one call
per customer present in the batch, with the kind and the inputs behind the rows, so a watermark's
text layer sees the texts). Under
light traffic a request waits at most ``max_wait_ms``; under load the batch fills from the queue
that built up while the previous batch ran (no wait at all). With ``enabled=False`` every request
runs alone on the same model thread (the baseline of the load benchmark).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ipshield.serve.backend import CustomerTransform, EmbeddingBackend


@dataclass
class _Job:
    kind: str
    items: list
    customer: str
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, backend: EmbeddingBackend, transform: CustomerTransform | None, enabled: bool = True,
                 max_items: int = 64, max_wait_ms: float = 2.0, on_batch=None):
        self.backend = backend
        self.transform = transform
        self.enabled = enabled
        self.on_batch = on_batch  # called with (kind, items) after each forward pass (metrics)
        self.max_items = max(1, int(max_items))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipshield-model")
        self._queues: dict[str, asyncio.Queue] = {}
        self._carry: dict[str, _Job | None] = {}
        self._tasks: list[asyncio.Task] = []
        self.stats = {"batches": 0, "items": 0, "requests": 0}

    async def start(self) -> None:
        if not self.enabled:
            return
        for kind in ("image", "text"):
            self._queues[kind] = asyncio.Queue()
            self._carry[kind] = None
            self._tasks.append(asyncio.create_task(self._worker(kind)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, kind: str, items: list, customer: str) -> tuple[np.ndarray, np.ndarray]:
        """Clean and served (customer-transformed) embeddings of ``items``."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            return await loop.run_in_executor(self._executor, self._run_single, kind, items, customer)
        fut = loop.create_future()
        await self._queues[kind].put(_Job(kind, items, customer, fut))
        return await fut

    def _forward(self, kind: str, items: list) -> np.ndarray:
        out = self.backend.embed_images(items) if kind == "image" else self.backend.embed_texts(items)
        return np.asarray(out, dtype=np.float32)

    def _served(self, clean: np.ndarray, customer: str, kind: str, items: list) -> np.ndarray:
        if self.transform is None:
            return clean
        return np.asarray(self.transform(customer, clean, kind, items), dtype=np.float32)

    def _run_single(self, kind: str, items: list, customer: str):
        clean = self._forward(kind, items)
        self.stats["batches"] += 1
        if self.on_batch is not None:
            self.on_batch(kind, len(items))
        self.stats["items"] += len(items)
        self.stats["requests"] += 1
        return clean, self._served(clean, customer, kind, items)

    def _run_batch(self, kind: str, jobs: list[_Job]):
        items = [x for j in jobs for x in j.items]
        clean = self._forward(kind, items)
        out, i = [], 0
        # one transform call per customer present in the batch (its rows and their inputs)
        by_customer: dict[str, list[int]] = {}
        for n, j in enumerate(jobs):
            by_customer.setdefault(j.customer, []).append(n)
        served_rows: dict[int, np.ndarray] = {}
        spans = []
        for j in jobs:
            spans.append((i, i + len(j.items)))
            i += len(j.items)
        for customer, idx in by_customer.items():
            rows = np.concatenate([np.arange(*spans[n]) for n in idx])
            s = self._served(clean[rows], customer, kind, [x for n in idx for x in jobs[n].items])
            k = 0
            for n in idx:
                m = spans[n][1] - spans[n][0]
                served_rows[n] = s[k : k + m]
                k += m
        for n, j in enumerate(jobs):
            a, b = spans[n]
            out.append((clean[a:b], served_rows[n]))
        self.stats["batches"] += 1
        if self.on_batch is not None:
            self.on_batch(kind, len(items))
        self.stats["items"] += len(items)
        self.stats["requests"] += len(jobs)
        return out

    async def _worker(self, kind: str) -> None:
        q = self._queues[kind]
        loop = asyncio.get_running_loop()
        while True:
            job = self._carry[kind] or await q.get()
            self._carry[kind] = None
            jobs, n = [job], len(job.items)
            deadline = loop.time() + self.max_wait
            while n < self.max_items:
                try:
                    nxt = q.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(q.get(), left)
                    except (asyncio.TimeoutError, TimeoutError):
                        break
                if n + len(nxt.items) > self.max_items:
                    self._carry[kind] = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.items)
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, kind, jobs)
            except asyncio.CancelledError:
                for j in jobs:
                    if not j.future.done():
                        j.future.cancel()
                raise
            except Exception as exc:  # the handlers turn it into a generic 500
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, r in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result(r)
