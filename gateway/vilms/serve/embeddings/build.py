"""Which embedders a gateway process holds, and with which batching settings, from the config.

Batch size, wait window and forward-pass size default per device kind (`embedding.batch-defaults` in the schema: a sweep on CPU, a
guess for CUDA until a GPU run); an explicit `max-batch-size` / `max-wait-ms` wins. With several gateway workers the
local models live in one shared encoder process (`shared.py`) unless `embedding.encoder: in-process` asks for a
replica per worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

from vilms.config.model import Config
from vilms.config.routing import Router
from vilms.config.weights import runtime_source
from vilms.serve.embeddings.local import LocalEmbedder
from vilms.serve.embeddings.shared import SOCKET_ENV, EncoderClient, SharedEmbedder

Embedder = Union[LocalEmbedder, SharedEmbedder]


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int
    max_wait_ms: float
    batching: bool
    forward: int  # sentences per forward pass (a batch is length-sorted first)


def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def batch_settings(emb: dict[str, Any]) -> BatchSettings:
    defaults = emb["batch-defaults"][device_kind(emb["device"])]
    size = emb.get("max-batch-size")
    wait = emb.get("max-wait-ms")
    max_batch = defaults["max-batch-size"] if size is None else size
    forward = emb.get("forward-batch-size") or defaults.get("forward-batch-size") or max_batch
    return BatchSettings(max_batch=max_batch, max_wait_ms=defaults["max-wait-ms"] if wait is None else wait,
                         batching=emb["batching"], forward=min(forward, max_batch))


def local_routes(config: Config, router: Router | None = None) -> list[Any]:
    router = router or Router(config)
    return [route for route in router.routes.values() if route.spec.is_embedding and route.engine == "local"]


def shared_encoder_wanted(config: Config, workers: int) -> bool:
    """True when `vilms serve` should start one encoder process for all workers."""
    mode = config.embedding["encoder"]
    if mode == "auto":
        return workers > 1 and bool(local_routes(config))
    return mode == "shared" and bool(local_routes(config))


def local_embedders(config: Config, router: Router | None = None) -> dict[str, LocalEmbedder]:
    emb = config.embedding
    settings = batch_settings(emb)
    return {route.name: LocalEmbedder(route.name, runtime_source(config, route.spec), device=emb["device"],
                                      trust_remote_code=route.spec.trust_remote_code, max_batch=settings.max_batch,
                                      max_wait_ms=settings.max_wait_ms, batching=settings.batching,
                                      forward=settings.forward)
            for route in local_routes(config, router)}


def build_embedders(config: Config, router: Router) -> dict[str, Embedder]:
    """This worker's embedders: handles on the shared encoder process when `vilms serve` started one, else its own."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        client = EncoderClient(path)
        return {route.name: SharedEmbedder(route.name, client, runtime_source(config, route.spec))
                for route in local_routes(config, router)}
    return dict(local_embedders(config, router))
