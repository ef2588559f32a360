"""Local sentence-transformers encoding, loaded once per process, batched across concurrent callers.

Concurrent requests are queued; one consumer takes whatever is waiting (up to `max_batch` sentences,
waiting at most `max_wait_ms` for more) and encodes it in one call on a worker thread, so 64 callers
with one sentence each cost about one batch of 64 rather than 64 batches, and the event loop keeps
serving chat meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadRequest, GatewayError
from ..observe import EMBED_BATCH

log = logging.getLogger("vilms.embeddings")


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class LocalEmbedder:
    def __init__(self, name: str, source: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 max_batch: int = 64, max_wait_ms: float = 2.0, batching: bool = True):
        self.name = name
        self.source = source
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batching = batching
        self.model: Any = None
        self.dimension: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name[:16]}")
        self._load_lock = asyncio.Lock()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._consumer: asyncio.Task | None = None

    def _load_blocking(self) -> None:
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        self.model = SentenceTransformer(self.source, device=self.device, trust_remote_code=self.trust_remote_code)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        log.info("embedding model loaded", extra={"fields": {"model": self.name, "device": self.device,
                                                             "dimension": self.dimension,
                                                             "seconds": round(time.perf_counter() - started, 2)}})

    async def load(self) -> None:
        async with self._load_lock:
            if self.model is None:
                try:
                    await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking)
                except Exception as exc:  # surfaced to callers as a clear 503, not a stack trace
                    raise GatewayError(f"embedding model {self.name!r} could not be loaded: {type(exc).__name__}: {exc}",
                                       status=503, type="upstream_unavailable", code="embedding_model_unavailable") from exc

    def _encode_blocking(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        features = self.model.tokenizer(texts, add_special_tokens=True, truncation=True,
                                        max_length=self.model.max_seq_length)
        counts = [len(ids) for ids in features["input_ids"]]
        vectors = self.model.encode(texts, batch_size=self.max_batch, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), counts

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for `texts` (rows in order) and the number of tokens the model read."""
        if self.model is None:
            await self.load()
        loop = asyncio.get_running_loop()
        if not self.batching:
            vectors, counts = await loop.run_in_executor(self._executor, self._encode_blocking, texts)
            EMBED_BATCH.labels(self.name).observe(len(texts))
            return vectors, sum(counts)
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.create_task(self._consume(), name=f"embed-batcher-{self.name}")
        job = _Job(texts, loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    jobs.append(self._queue.get_nowait())
                size += len(jobs[-1].texts)
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            texts = [t for j in jobs for t in j.texts]
            EMBED_BATCH.labels(self.name).observe(len(texts))
            try:
                vectors, counts = await loop.run_in_executor(self._executor, self._encode_blocking, texts)
            except Exception as exc:  # one bad batch fails its callers, never the batcher
                error = GatewayError(f"local embedding failed: {type(exc).__name__}: {exc}", status=500,
                                     type="server_error")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(error)
                continue
            start = 0
            for j in jobs:
                end = start + len(j.texts)
                if not j.future.done():
                    j.future.set_result((vectors[start:end], sum(counts[start:end])))
                start = end

    def check_dimensions(self, dimensions: int | None, matryoshka: bool) -> None:
        native = self.dimension
        if dimensions is None or native is None or dimensions == native:
            return
        if not matryoshka:
            raise BadRequest(f"model {self.name!r} produces {native}-dimensional vectors and cannot shorten them "
                             "(set matryoshka: true for models trained for it)", param="dimensions")
        if dimensions > native:
            raise BadRequest(f"dimensions must be at most {native} for {self.name!r}", param="dimensions")

    async def aclose(self) -> None:
        if self._consumer:
            self._consumer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
