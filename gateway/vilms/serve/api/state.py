"""Everything a running gateway holds, built once from the config at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vilms.config.model import Config
from vilms.serve.embeddings.build import Embedder, batch_settings, build_embedders
from vilms.serve.engines import Engine, build_engines
from vilms.serve.fetch import ImageFetcher
from vilms.serve.media import ImageLimits
from vilms.config.params import request_defaults
from vilms.serve.rerank import LocalReranker
from vilms.serve.upstream import Upstream, make_upstream
from vilms.config.routing import Router
from vilms.config.weights import runtime_source
from vilms.serve.api.readiness import model_report

log = logging.getLogger("vilms.gateway")


@dataclass
class RouteExtras:
    """Per-model values computed once so a request does dict lookups only."""

    defaults: dict[str, Any]
    max_tokens: int | None
    image_limits: ImageLimits
    stream: bool = False  # params.stream: the answer mode of requests that leave `stream` out


@dataclass
class GatewayState:
    config: Config
    router: Router
    fetcher: ImageFetcher
    embedders: dict[str, Embedder]
    extras: dict[str, RouteExtras]
    started: int = field(default_factory=lambda: int(time.time()))
    upstream: Upstream | None = None  # the engines' client
    engines: dict[str, Engine] = field(default_factory=dict)
    embed_errors: dict[str, str] = field(default_factory=dict)  # eager loads that failed: readiness says "failed"
    rerankers: dict[str, LocalReranker] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config) -> "GatewayState":
        router = Router(config)
        serving, media = config.serving, config.media
        extras = {}
        for name, route in router.routes.items():
            params = route.spec.params
            extras[name] = RouteExtras(
                defaults=request_defaults(params, route.engine),
                max_tokens=params.get("max-tokens"),
                image_limits=ImageLimits(max_frames=params.get("max-frames", serving["default-max-frames"]),
                                         max_side=params.get("max-image-side", serving["default-max-image-side"]),
                                         max_pixels=media["max-pixels"], max_bytes=media["max-bytes"],
                                         formats=tuple(media["formats"])),
                stream=params.get("stream", False),
            )
        for name, route in router.adapters.items():  # an adapter runs with its base model's params and limits
            extras[name] = extras[route.spec.parent]
        settings = batch_settings(config.embedding)
        rerankers = {name: LocalReranker(name, runtime_source(config, route.spec), device=config.embedding["device"],
                                         trust_remote_code=route.spec.trust_remote_code,
                                         max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                         forward=settings.forward)
                     for name, route in router.routes.items()
                     if route.spec.type == "reranker" and route.in_gateway}
        return cls(config, router, ImageFetcher(media), build_embedders(config, router), extras, rerankers=rerankers)

    async def start(self) -> None:
        # the engines' client belongs to the event loop it was made in: create it here, in the server's loop.
        self.upstream = make_upstream(self.config.gateway)
        gw = self.config.gateway
        self.engines.update(build_engines(self.upstream, gw["total-timeout"], gw["max-reply-bytes"],
                                          gw["max-reply-line-bytes"], gw["stream-timeout"]))
        if self.config.embedding["load"] == "eager":
            for reranker in self.rerankers.values():  # local rerankers follow embedding.load too
                try:
                    await reranker.load()
                except Exception as exc:  # keep serving; the first rerank request answers 503 with the reason
                    log.error("reranker failed to load", extra={"fields": {"model": reranker.name, "error": str(exc)}})
            for embedder in self.embedders.values():
                try:
                    await embedder.load()
                except Exception as exc:  # keep serving chat; readiness reports the embedder as failed
                    self.embed_errors[embedder.name] = str(exc)
                    log.error("embedding model failed to load", extra={"fields": {"model": embedder.name,
                                                                                 "error": str(exc)}})

    async def stop(self) -> None:
        for embedder in self.embedders.values():
            await embedder.aclose()
        for reranker in self.rerankers.values():
            await reranker.aclose()
        await self.fetcher.aclose()
        if self.upstream is not None:
            await self.upstream.close()

    async def readiness(self) -> dict[str, Any]:
        """Every configured model with its state; "ready" only when all are (see api/readiness.py)."""
        assert self.upstream is not None, "readiness is served only after start()"
        return await model_report(self.router, self.engines, self.local_runners(), self.embed_errors)

    def local_runners(self) -> dict[str, Any]:
        """Every model the gateway runs in-process, by name: readiness asks each whether it is loaded or loadable."""
        runners: dict[str, Any] = dict(self.embedders)
        runners.update(self.rerankers)  # in-gateway rerankers have the same shape
        return runners
