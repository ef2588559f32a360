"""Per-model readiness: every configured model, with its state; the host is ready only when all of them are.

States (one per model, aliases listed with it):
  ready        the engine answers and, for Ollama and vLLM, lists the model; an in-gateway model is loaded
  missing      the engine answers but does not list the model (an Ollama model not pulled, a wrong vLLM name)
  unreachable  no URL of the model's engine answers
  loadable     lazy in-gateway model (embedder, reranker), not loaded yet, its files are on disk: counts as ready (the deploy gate's one
               real embedding then loads it); probing never loads it, so readiness stays cheap and lazy stays lazy
  not-found    lazy in-gateway model whose directory or cached HF snapshot is absent
  failed       local embedder whose eager load raised at start-up (the error is in the gateway's log)
  unknown      a model nothing here knows how to probe (never counted as ready)
Generic OpenAI-compatible servers are judged by their /v1/models answering: proxies list names differently.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Mapping, Protocol

from vilms.config.routing import Route, Router
from vilms.serve.engines.base import Engine, Listing

READY_STATES = ("ready", "loadable")
MODEL_FILES = ("modules.json", "config_sentence_transformers.json", "config.json")


class LocalRunner(Protocol):
    """A model the gateway runs in-process (an embedder, a reranker): loaded once `model` is set."""

    source: str
    model: Any


def route_state(route: Route, engine: Engine, listing: Listing) -> str:
    if not listing.reachable:
        return "unreachable"
    if listing.names is None:
        return "ready"
    return "ready" if engine.listed_name(route.name) in listing.names else "missing"


def files_present(source: str) -> bool:
    """Whether a sentence-transformers model can be loaded without a download (no network, nothing loaded)."""
    path = Path(source)
    if path.is_dir():
        return any((path / f).is_file() for f in MODEL_FILES)
    if source.startswith((".", "/", "~")):
        return False
    from huggingface_hub import try_to_load_from_cache

    candidates = [source] if "/" in source else [source, f"sentence-transformers/{source}"]
    return any(isinstance(try_to_load_from_cache(c, f), str) for c in candidates for f in MODEL_FILES)


async def local_state(runner: LocalRunner, error: str | None) -> str:
    if runner.model is not None:
        return "ready"
    probe = getattr(runner, "probe", None)
    if probe is not None:  # a model held by another process (the shared encoder): ask it, do not guess from files
        return await probe()
    if error:
        return "failed"
    present = await asyncio.get_running_loop().run_in_executor(None, files_present, runner.source)
    return "loadable" if present else "not-found"


def _aliases(router: Router) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias in router.aliases:
        target = router.follow(alias)
        if target in router.routes:
            out.setdefault(target, []).append(alias)
    return out


async def model_report(router: Router, engines: Mapping[str, Engine], local: Mapping[str, LocalRunner],
                       load_errors: Mapping[str, str]) -> dict[str, Any]:
    """{"status", "models": [{model, type, engine, aliases, state, ready}], "backends": [...]}, probes concurrent:
    each engine adapter lists its own models (Engine.listing)."""
    groups = [(key, routes) for key, routes in router.engines().items() if key[0] != "local"]
    listings = await asyncio.gather(*(engines[engine].listing(urls) for (engine, urls), _ in groups))
    states: dict[str, str] = {}
    backends = []
    for ((engine, _), routes), listing in zip(groups, listings):
        for route in routes:
            states[route.name] = route_state(route, engines[engine], listing)
        backends.append({"engine": engine, "models": [r.name for r in routes], "ready": listing.reachable})
    runners = list(local.items())
    for (name, _), state in zip(runners, await asyncio.gather(
            *(local_state(r, load_errors.get(n)) for n, r in runners))):
        states[name] = state
        backends.append({"engine": "local", "models": [name], "ready": state in READY_STATES})
    aliases = _aliases(router)
    models = []
    for name, route in router.routes.items():
        state = states.get(name, "unknown")  # a route nothing above could judge is never counted as ready
        models.append({"model": name, "type": route.spec.type, "engine": route.engine,
                       "aliases": aliases.get(name, []), "state": state, "ready": state in READY_STATES})
    ready = bool(models) and all(m["ready"] for m in models)
    return {"status": "ready" if ready else "unavailable", "models": models, "backends": backends}
