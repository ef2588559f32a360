"""Rerank: the request shape (Cohere/Jina, as vLLM answers it) and a local sentence-transformers CrossEncoder.

The local model is loaded once per process and scored on one worker thread (never on the event loop).
Concurrent requests are coalesced: one consumer takes whatever (query, document) pairs are waiting, up to
`max_batch` pairs, waiting at most `max_wait_ms` for more, and scores them in one `predict` call, so 64 callers
cost a few batches rather than 64 calls.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import BadRequest, GatewayError

log = logging.getLogger("vilms.rerank")
MAX_DOCUMENTS = 1000


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str | dict[str, Any]] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True


def document_texts(documents: list[str | dict[str, Any]]) -> list[str]:
    """Documents as strings: each a string or an object with a string `text` (Cohere/Jina)."""
    texts = []
    for i, doc in enumerate(documents):
        text = doc if isinstance(doc, str) else doc.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"documents[{i}] must be a string or an object with a string 'text'",
                             param=f"documents[{i}]")
        texts.append(text)
    return texts


def rerank_body(model: str, request: RerankRequest, texts: list[str], scores: list[float], tokens: int) -> dict[str, Any]:
    """The answer vLLM gives: results sorted by score (best first), cut to top_n, documents when asked."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.top_n or len(scores)]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if request.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@dataclass
class _Job:
    pairs: list[tuple[str, str]]
    future: asyncio.Future = field(repr=False)


class LocalReranker:
    """One CrossEncoder in the gateway process; `score` is safe to call from many requests at once."""

    def __init__(self, name: str, source: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 max_batch: int = 64, max_wait_ms: float = 2.0):
        self.name = name
        self.source = source
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.model: Any = None
        self.predict_calls = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rerank-{name[:16]}")
        self._load_lock = asyncio.Lock()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._consumer: asyncio.Task | None = None

    def _load_blocking(self) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(self.source, device=self.device, trust_remote_code=self.trust_remote_code)
        log.info("reranker loaded", extra={"fields": {"model": self.name, "device": self.device}})

    async def load(self) -> None:
        async with self._load_lock:
            if self.model is None:
                try:
                    await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking)
                except Exception as exc:  # a clear 503, not a stack trace
                    raise GatewayError(f"reranker {self.name!r} could not be loaded: {type(exc).__name__}: {exc}",
                                       status=503, type="upstream_unavailable", code="reranker_unavailable") from exc

    def _predict_blocking(self, pairs: list[tuple[str, str]]) -> tuple[list[float], list[int]]:
        self.predict_calls += 1
        features = self.model.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True,
                                        max_length=self.model.max_seq_length)
        scores = self.model.predict(pairs, batch_size=self.max_batch, convert_to_numpy=True, show_progress_bar=False)
        return [float(s) for s in scores], [len(ids) for ids in features["input_ids"]]

    async def score(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """One relevance score per document (in order) and the number of tokens the model read."""
        if self.model is None:
            await self.load()
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.create_task(self._consume(), name=f"rerank-batcher-{self.name}")
        job = _Job([(query, d) for d in documents], loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _gather(self) -> list[_Job]:
        """The first waiting job plus any that arrive within max_wait, up to max_batch pairs."""
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        size, deadline = len(jobs[0].pairs), loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait() if not self._queue.empty() else \
                    await asyncio.wait_for(self._queue.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                break
            jobs.append(job)
            size += len(job.pairs)
        return [j for j in jobs if not j.future.cancelled()]

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            pairs = [p for j in jobs for p in j.pairs]
            try:
                scores, counts = await loop.run_in_executor(self._executor, self._predict_blocking, pairs)
            except Exception as exc:  # one bad batch fails its callers, never the batcher
                error = GatewayError(f"local rerank failed: {type(exc).__name__}: {exc}", status=500,
                                     type="server_error")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(error)
                continue
            start = 0
            for j in jobs:
                end = start + len(j.pairs)
                if not j.future.done():
                    j.future.set_result((scores[start:end], sum(counts[start:end])))
                start = end

    async def aclose(self) -> None:
        if self._consumer:
            self._consumer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
