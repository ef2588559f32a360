"""Dynamic batching: concurrent callers' texts coalesced into one blocking encode on a worker thread.

One consumer task takes whatever is queued (up to `max_batch` sentences, waiting at most `max_wait` seconds for more
after the first arrives) and runs the encode on a single-thread executor, so 64 callers with one sentence each cost
about one forward of 64 rather than 64 forwards, and the event loop keeps serving other requests meanwhile. While a
batch encodes, new callers queue up and form the next batch. With `encode_parts` (an embedder's forward passes),
each caller is answered as soon as the pass holding its last row ends, not when the whole batch does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from vilms.errors import GatewayError
from vilms.serve.observe import EMBED_BATCH

# Texts for embedders, (query, document) pairs for rerankers: rows and per-item token counts, in input order.
EncodeFn = Callable[[list], tuple[np.ndarray, np.ndarray]]
# The same work as it goes: (row indices, rows, token counts) per forward pass, in any order of rows.
PartsFn = Callable[[list], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]]


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, name: str, encode: EncodeFn, executor: ThreadPoolExecutor, *, max_batch: int,
                 max_wait_ms: float, batching: bool = True, encode_parts: PartsFn | None = None):
        self.name = name
        self.encode = encode
        self.encode_parts = encode_parts
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batching = batching
        self._batch_sizes = EMBED_BATCH.labels(name)  # bound once, not per batch
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # sentences in _jobs
        self._arrived = asyncio.Event()  # set when _jobs is not empty
        self._full = asyncio.Event()  # set when _jobs holds max_batch sentences or more
        self._consumer: asyncio.Task | None = None

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (rows in the order of `texts`) and per-text token counts."""
        loop = asyncio.get_running_loop()
        if not self.batching:
            self._batch_sizes.observe(len(texts))
            return await loop.run_in_executor(self.executor, self.encode, texts)
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.create_task(self._consume(), name=f"embed-batcher-{self.name}")
        job = _Job(texts, loop.create_future())
        self._jobs.append(job)
        self._queued += len(texts)
        self._arrived.set()
        if self._queued >= self.max_batch:
            self._full.set()
        return await job.future

    async def _gather(self) -> list[_Job]:
        """The next batch: what waits, once `max_batch` sentences are there or the wait window (from the first
        job's turn) ends. One timer per batch, not one per caller (a wait_for per queued job cost a task each)."""
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        if self._queued < self.max_batch and self.max_wait > 0:
            self._full.clear()
            try:
                async with asyncio.timeout(self.max_wait):
                    await self._full.wait()
            except TimeoutError:
                pass
        jobs, size = [], 0
        while self._jobs and size < self.max_batch:
            job = self._jobs.popleft()
            jobs.append(job)
            size += len(job.texts)
        self._queued -= size
        if self._queued < self.max_batch:
            self._full.clear()
        return [j for j in jobs if not j.future.cancelled()]

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            texts = jobs[0].texts if len(jobs) == 1 else [t for j in jobs for t in j.texts]
            self._batch_sizes.observe(len(texts))
            try:
                if self.encode_parts is not None and len(jobs) > 1:
                    await loop.run_in_executor(self.executor, self._encode_in_parts, loop, jobs, texts)
                    continue
                vectors, counts = await loop.run_in_executor(self.executor, self.encode, texts)
            except Exception as exc:  # one bad batch fails its callers, never the batcher
                error = GatewayError(f"local model {self.name!r} failed: {type(exc).__name__}: {exc}", status=500,
                                     type="server_error")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(error)
                continue
            start = 0
            for j in jobs:
                end = start + len(j.texts)
                if not j.future.done():
                    j.future.set_result((vectors[start:end], counts[start:end]))
                start = end

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()

    def _encode_in_parts(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], texts: list[str]) -> None:
        """Worker thread: run the passes, and after each one hand the loop the callers it completed.

        Rows land in one matrix for the batch; a finished caller gets a view of its own rows, which later passes
        never write. Bookkeeping is a few numpy operations per pass, not per row.
        """
        assert self.encode_parts is not None
        sizes = np.fromiter((len(j.texts) for j in jobs), dtype=np.int64, count=len(jobs))
        ends = np.cumsum(sizes)
        starts = ends - sizes
        owner = np.repeat(np.arange(len(jobs)), sizes)  # row -> the job it belongs to
        counts = np.empty(len(texts), dtype=np.int64)
        remaining = sizes.copy()
        out: np.ndarray | None = None
        passes = iter(self.encode_parts(texts))
        try:
            for index, rows, part_counts in passes:
                if out is None:
                    out = np.empty((len(texts), rows.shape[1]), dtype=rows.dtype)
                out[index] = rows
                counts[index] = part_counts
                touched = owner[index]
                remaining -= np.bincount(touched, minlength=len(jobs))
                done = np.unique(touched[remaining[touched] == 0])
                if done.size:
                    answers = [(jobs[j], out[starts[j]:ends[j]], counts[starts[j]:ends[j]]) for j in done]
                    loop.call_soon_threadsafe(_answer, answers)
            empty = np.flatnonzero(sizes == 0).tolist()  # no pass touches a caller without texts: answer it last
            if empty:
                rows_of_none = out[:0] if out is not None else np.empty((0, 0), dtype="<f4")
                loop.call_soon_threadsafe(_answer, [(jobs[j], rows_of_none, counts[:0]) for j in empty])
            if remaining.any():  # the passes left rows out: fail the callers still waiting (the batcher does)
                raise RuntimeError(f"the encoder returned {int(sizes.sum() - remaining.sum())} of {len(texts)} rows")
        finally:  # a generator must end on this thread (encoder.passes holds torch's per-thread inference mode)
            close = getattr(passes, "close", None)
            if close is not None:
                close()


def _answer(answers: list[tuple[_Job, np.ndarray, np.ndarray]]) -> None:
    for job, vectors, counts in answers:
        if not job.future.done():
            job.future.set_result((vectors, counts))
