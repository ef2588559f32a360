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
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vilms.serve.embeddings.batcher import Batcher
from vilms.errors import BadRequest, GatewayError

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


class LocalReranker:
    """One CrossEncoder in the gateway process; `score` is safe to call from many requests at once."""

    def __init__(self, name: str, source: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 max_batch: int = 64, max_wait_ms: float = 2.0, forward: int | None = None):
        self.name = name
        self.source = source
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.max_batch = max_batch
        self.forward = min(forward or max_batch, max_batch)  # pairs per predict pass (embedding.forward-batch-size)
        self.model: Any = None
        self.predict_calls = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rerank-{name[:16]}")
        self._load_lock = asyncio.Lock()
        # the embedders' batcher: concurrent callers' (query, document) pairs become one predict on the worker thread
        self._batcher = Batcher(name, self._predict_blocking, self._executor, max_batch=max_batch,
                                max_wait_ms=max_wait_ms)

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

    def _predict_blocking(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        self.predict_calls += 1
        features = self.model.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True,
                                        max_length=self.model.max_seq_length)
        scores = self.model.predict(pairs, batch_size=self.forward, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32), np.asarray([len(ids) for ids in features["input_ids"]])

    async def score(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """One relevance score per document (in order) and the number of tokens the model read."""
        if self.model is None:
            await self.load()
        scores, counts = await self._batcher.submit([(query, d) for d in documents])
        return [float(x) for x in scores], int(counts.sum())

    async def aclose(self) -> None:
        self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
