"""`vilms serve` with a stand-in sentence encoder: rows of the right shape at once, so what a request costs is the
gateway's own work (HTTP, checks, batcher, shared-encoder IPC, response encoding), not the model's.

    python -m bench.standin_gateway serve --config C.yaml --port P

The patch sits at module level: uvicorn's workers and the shared encoder process are spawned, and a spawned child
imports this module again (as `__mp_main__`) before it runs anything, so every process of the gateway gets it.
Only `SentenceEncoder`'s load/encode/passes change; the batcher, the IPC and the response path are the real ones.
"""

from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from vilms.serve.embeddings.encoder import SentenceEncoder

DIMENSION = 384
_TABLE = np.random.default_rng(7).standard_normal((256, DIMENSION)).astype("<f4")
_TABLE /= np.linalg.norm(_TABLE, axis=1, keepdims=True)


def standin_rows(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic unit rows (picked by text length) and a token count per text (its words + 2)."""
    pick = np.fromiter((len(t) & 255 for t in texts), dtype=np.int64, count=len(texts))
    counts = np.fromiter((t.count(" ") + 3 for t in texts), dtype=np.int64, count=len(texts))
    return _TABLE[pick], counts


def _load(self: SentenceEncoder) -> None:
    self.model, self.dimension = "stand-in", DIMENSION


def _encode(self: SentenceEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return standin_rows(texts)


def _passes(self: SentenceEncoder, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rows, counts = standin_rows(texts)
    yield np.arange(len(texts)), rows, counts


SentenceEncoder.load = _load  # type: ignore[method-assign]
SentenceEncoder.encode = _encode  # type: ignore[method-assign]
SentenceEncoder.passes = _passes  # type: ignore[method-assign]

if __name__ == "__main__":
    from vilms.cli import main

    sys.exit(main())
