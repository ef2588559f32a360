"""The blocking encode step: tokenize once, forward on the device, one transfer to host per batch.

`SentenceTransformer.encode()` is not used because the gateway also needs each input's token count, and asking the
tokenizer for it separately tokenizes every text twice (on an H200, 9.6 ms of a 1024-sentence request whose whole
model forward took 54 ms). Here the token counts are read off the attention mask of the very features that feed the
model, and the embeddings are gathered on the device and copied to the host once, as one C-contiguous
little-endian float32 matrix the response encoder can serialise without touching a Python float.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np

log = logging.getLogger("vilms.embeddings")


class SentenceEncoder:
    """One loaded sentence-transformers model; every method blocks (call it from a worker thread)."""

    def __init__(self, name: str, source: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 chunk: int = 64):
        self.name = name
        self.source = source
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.chunk = chunk  # sentences per forward pass (texts are length-sorted first, as encode() does)
        self.model: Any = None
        self.dimension: int | None = None
        self._prompt: str | None = None

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        model = SentenceTransformer(self.source, device=self.device, trust_remote_code=self.trust_remote_code)
        model.eval()
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        default_prompt = getattr(model, "default_prompt_name", None)
        self._prompt = (getattr(model, "prompts", None) or {}).get(default_prompt) if default_prompt else None
        self.model = model
        log.info("embedding model loaded", extra={"fields": {"model": self.name, "device": self.device,
                                                             "dimension": self.dimension,
                                                             "seconds": round(time.perf_counter() - started, 2)}})

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """Tokenized inputs on the CPU, exactly as encode() would build them (default prompt included)."""
        model = self.model
        preprocess = getattr(model, "preprocess", None)  # sentence-transformers >= 6; tokenize() before
        if preprocess is not None:
            return preprocess(texts, prompt=self._prompt) if self._prompt else preprocess(texts)
        if self._prompt:
            texts = [self._prompt + t for t in texts]
        return model.tokenize(texts)

    def _forward(self, texts: list[str]) -> tuple[Any, np.ndarray]:
        """One forward pass (inside inference_mode): float32 rows on the device, and the tokens each text fed it."""
        import torch

        model = self.model
        features = self._features(texts)
        mask = features.get("attention_mask")
        counts = mask.sum(dim=1).numpy() if mask is not None else np.full(len(texts), features["input_ids"].shape[1])
        features = {k: (v.to(model.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                    for k, v in features.items()}
        return model(features)["sentence_embedding"].to(torch.float32), counts

    def _order(self, texts: list[str]) -> list[np.ndarray]:
        """Row indices per forward pass: longest texts first, `chunk` at a time (as encode() sorts)."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        return [order[start:start + self.chunk] for start in range(0, len(texts), self.chunk)]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, token counts): one float32 row per text, in the order given, and the tokens each one fed the model.

        Texts are sorted by length and run in chunks of `chunk` so short ones are not padded to the longest of a big
        batch. Rows are scattered back into one device tensor; the host sees a single copy of it.
        """
        import torch

        n = len(texts)
        counts = np.empty(n, dtype=np.int64)
        out: Any = None
        with torch.inference_mode():
            for index in self._order(texts):
                rows, counts[index] = self._forward([texts[i] for i in index])
                if out is None:
                    out = torch.empty((n, rows.shape[1]), dtype=torch.float32, device=rows.device)
                out[torch.from_numpy(index).to(rows.device)] = rows
            host = out.cpu().numpy()  # the one device-to-host transfer (a no-op view on CPU)
        return np.ascontiguousarray(host, dtype="<f4"), counts

    def passes(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, float32 rows on the host, token counts) after each forward pass, longest texts first.

        The batcher answers every caller whose rows are all done while later passes still run, so a one-sentence
        request is not held until the slowest pass of a large batch (one host copy per pass; on CUDA the default
        pass is the whole batch). Exhaust or close it on the thread that started it (inference_mode is per thread).
        """
        import torch

        with torch.inference_mode():
            for index in self._order(texts):
                rows, counts = self._forward([texts[i] for i in index])
                yield index, np.ascontiguousarray(rows.cpu().numpy(), dtype="<f4"), counts
