"""Everything a running gateway holds, built once from the config at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..config import Config
from ..embeddings.local import LocalEmbedder
from ..engines import Engine, build_engines
from ..fetch import ImageFetcher
from ..http import make_session
from ..media import ImageLimits
from ..params import request_defaults
from ..rerank import LocalReranker
from ..routing import Route, Router

log = logging.getLogger("vilms.gateway")


@dataclass
class RouteExtras:
    """Per-model values computed once so a request does dict lookups only."""

    defaults: dict[str, Any]
    max_tokens: int | None
    image_limits: ImageLimits


@dataclass
class GatewayState:
    config: Config
    router: Router
    fetcher: ImageFetcher
    embedders: dict[str, LocalEmbedder]
    extras: dict[str, RouteExtras]
    started: int = field(default_factory=lambda: int(time.time()))
    session: aiohttp.ClientSession | None = None
    engines: dict[str, Engine] = field(default_factory=dict)
    rerankers: dict[str, LocalReranker] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config) -> "GatewayState":
        router = Router(config)
        serving, media, emb = config.serving, config.media, config.embedding
        extras = {}
        for name, route in router.routes.items():
            params = route.spec.params
            extras[name] = RouteExtras(
                defaults=request_defaults(params, route.engine),
                max_tokens=params.get("max-tokens"),
                image_limits=ImageLimits(max_frames=params.get("max-frames", serving["default-max-frames"]),
                                         max_side=params.get("max-image-side", serving["default-max-image-side"]),
                                         max_pixels=media["max-pixels"]),
            )
        for name, route in router.adapters.items():  # an adapter runs with its base model's params and limits
            extras[name] = extras[route.spec.parent]
        embedders = {}
        for name, route in router.routes.items():
            if route.spec.is_embedding and route.engine == "local":
                embedders[name] = LocalEmbedder(name, route.spec.path or route.spec.name, device=emb["device"],
                                                trust_remote_code=route.spec.trust_remote_code,
                                                max_batch=emb["max-batch-size"], max_wait_ms=emb["max-wait-ms"],
                                                batching=emb["batching"])
        rerankers = {name: LocalReranker(name, route.spec.path or route.spec.name, device=emb["device"],
                                         trust_remote_code=route.spec.trust_remote_code,
                                         max_batch=emb["max-batch-size"], max_wait_ms=emb["max-wait-ms"])
                     for name, route in router.routes.items()
                     if route.spec.type == "reranker" and route.engine == "local"}
        return cls(config, router, ImageFetcher(media), embedders, extras, rerankers=rerankers)

    async def start(self) -> None:
        # aiohttp sessions belong to the event loop they were made in: create it here, in the server's loop.
        self.session = make_session(self.config.gateway)
        self.engines.update(build_engines(self.session, self.config.gateway["total-timeout"]))
        if self.config.embedding["load"] == "eager":
            for reranker in self.rerankers.values():  # local rerankers follow embedding.load too
                try:
                    await reranker.load()
                except Exception as exc:  # keep serving; the first rerank request answers 503 with the reason
                    log.error("reranker failed to load", extra={"fields": {"model": reranker.name, "error": str(exc)}})
            for embedder in self.embedders.values():
                try:
                    await embedder.load()
                except Exception as exc:  # keep serving chat; readiness reports the embedder as down
                    log.error("embedding model failed to load", extra={"fields": {"model": embedder.name,
                                                                                 "error": str(exc)}})

    async def stop(self) -> None:
        for embedder in self.embedders.values():
            await embedder.aclose()
        for reranker in self.rerankers.values():
            await reranker.aclose()
        await self.fetcher.aclose()
        if self.session is not None:
            await self.session.close()

    async def readiness(self) -> dict[str, Any]:
        async def probe(engine: str, urls: tuple[str, ...]) -> bool:
            for url in urls:
                if await self.engines[engine].ready(url):
                    return True
            return False

        checks: list[tuple[str, list[Route], Any]] = []
        for (engine, urls), routes in self.router.engines().items():
            if engine == "local":
                continue
            checks.append((engine, routes, probe(engine, urls)))
        results = await asyncio.gather(*(c[2] for c in checks))
        backends = [{"engine": engine, "models": [r.name for r in routes], "ready": ok}
                    for (engine, routes, _), ok in zip(checks, results)]
        for name, reranker in self.rerankers.items():
            lazy = self.config.embedding["load"] == "lazy"
            backends.append({"engine": "local", "models": [name], "ready": reranker.model is not None or lazy})
        for name, embedder in self.embedders.items():
            lazy = self.config.embedding["load"] == "lazy"
            backends.append({"engine": "local", "models": [name], "ready": embedder.model is not None or lazy})
        return {"status": "ready" if any(b["ready"] for b in backends) else "unavailable", "backends": backends}
