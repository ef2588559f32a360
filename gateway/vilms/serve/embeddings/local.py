"""In-process local embeddings: the model lives in this gateway worker, batched across its concurrent callers.

The encode runs on a single worker thread (torch releases the GIL, so the event loop keeps serving meanwhile).
This is the default with one gateway worker; with several, `vilms serve` starts one shared encoder process instead
(`shared.py`), so the batching spans all workers and the model is loaded once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vilms.errors import BadRequest, GatewayError
from vilms.serve.embeddings.batcher import Batcher
from vilms.serve.embeddings.encoder import SentenceEncoder


class LocalEmbedder:
    kind = "in-process"

    def __init__(self, name: str, source: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 max_batch: int = 64, max_wait_ms: float = 2.0, batching: bool = True, forward: int | None = None):
        self.name = name
        self.encoder = SentenceEncoder(name, source, device=device, trust_remote_code=trust_remote_code,
                                       chunk=forward or max_batch)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name[:16]}")
        self.batcher = Batcher(name, self.encoder.encode, self._executor, max_batch=max_batch,
                               max_wait_ms=max_wait_ms, batching=batching, encode_parts=self.encoder.passes)
        self._load_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.encoder.model is not None

    @property
    def model(self) -> object | None:
        """Readiness's view (api/readiness.py): the loaded model, or None."""
        return self.encoder.model

    @property
    def source(self) -> str:
        return self.encoder.source

    @property
    def dimension(self) -> int | None:
        return self.encoder.dimension

    async def load(self) -> None:
        async with self._load_lock:
            if self.encoder.model is None:
                try:
                    await asyncio.get_running_loop().run_in_executor(self._executor, self.encoder.load)
                except Exception as exc:  # surfaced to callers as a clear 503, not a stack trace
                    raise GatewayError(f"embedding model {self.name!r} could not be loaded: {type(exc).__name__}: {exc}",
                                       status=503, type="upstream_unavailable", code="embedding_model_unavailable") from exc

    async def embed(self, texts: list[str], dimensions: int | None = None, matryoshka: bool = False
                    ) -> tuple[np.ndarray, int]:
        """Vectors for `texts` (rows in order, shortened to `dimensions` when asked) and the tokens the model read."""
        if self.encoder.model is None:
            await self.load()
        check_dimensions(self.name, self.dimension, dimensions, matryoshka)
        vectors, counts = await self.batcher.submit(texts)
        return shorten(vectors, dimensions), int(counts.sum())

    async def aclose(self) -> None:
        self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def check_dimensions(name: str, native: int | None, dimensions: int | None, matryoshka: bool) -> None:
    """A request's `dimensions` is fine when it equals the model's size, or is smaller and the model is matryoshka."""
    if dimensions is None or native is None or dimensions == native:
        return
    if not matryoshka:
        raise BadRequest(f"model {name!r} produces {native}-dimensional vectors and cannot shorten them "
                         "(set matryoshka: true for models trained for it)", param="dimensions")
    if dimensions > native:
        raise BadRequest(f"dimensions must be at most {native} for {name!r}", param="dimensions")


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: the first `dimensions` components, renormalised to unit length."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    head = vectors[:, :dimensions]
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
