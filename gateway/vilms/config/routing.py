"""The one alias/engine resolver: which model a name means, which engine serves it, at which URLs,
and which engine services the stack itself must run for those URLs to answer (`stack_services`).

Everything here is computed once per config; a request costs one dict lookup.
Chat routing follows the seed's five rules, in order:
  1. serving.engine == ollama      -> every chat model on Ollama
  2. host.platform == js (Jetson)  -> Ollama
  3. the model's own `engine`
  4. the model's `type` (vlm -> Ollama)
  5. legacy heuristic: a name containing "vl" -> Ollama; otherwise serving.engine
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from vilms.config.adapters import adapter_issues, adapter_spec, all_adapters
from vilms.config.cuda import cuda_issues
from vilms.config.model import Config, ModelSpec, as_url_list
from vilms.config.params import stream_issues
from vilms.config.schema import ConfigIssue

OLLAMA_DEFAULT_URL = "http://ollama:11434"
VLLM_PORT = 8000
STACK_ENGINES = ("ollama", "vllm")  # the engines compose knows how to run; `openai` servers are always external
GATEWAY_SERVICE = "gateway"


def vllm_service_name(model_name: str) -> str:
    """Compose service (and DNS) name of the vLLM container serving `model_name`.

    The gateway's default URL for a vLLM model; compose then finds the service in that URL (`stack_services`).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    return f"vllm-{slug[:48].rstrip('-') or 'model'}"


# Endpoint paths a URL may end with (the seed wrote `base-url: http://vilms-ollama:11434/v1/chat/completions`).
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/rerank")
_OLLAMA_ENDPOINTS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")


def strip_api_suffix(url: str, engine: str = "") -> str:
    """Accept `http://h:8000`, `http://h:8000/` or `http://h:8000/v1` (Ollama: also `/api`); engines add their own paths.

    A full endpoint URL, as the seed wrote it (`.../v1/chat/completions`; Ollama also `.../api/chat`), means its
    server: kept as written, the gateway would post to `.../v1/chat/completions/api/chat`.
    """
    url = url.rstrip("/")
    for endpoint in _ENDPOINTS + (_OLLAMA_ENDPOINTS if engine == "ollama" else ()):
        if url.endswith(endpoint):
            return url[:-len(endpoint)]
    if url.endswith("/v1"):
        return url[:-3]
    if engine == "ollama" and url.endswith("/api"):
        return url[:-4]
    return url


def stack_host(url: str, external: Iterable[str] = ()) -> tuple[str, int] | None:
    """(service, port) when `url` names a compose service of this stack, else None (an external server).

    The rule: a host that is a single DNS label -- no dot, not an IP literal, not `localhost`, not listed in
    `docker.external-services` -- can only be resolved by Docker's embedded DNS, so it is a service the stack
    runs (the seed's `http://vilms-ollama:11434`). A dotted name or an IP is a server elsewhere.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or "." in host or host == "localhost" or host in external:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        port = parts.port
    except ValueError:
        return None
    return host, port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class Route:
    """Where one model is served. `engine` is ollama | vllm | openai | local."""

    spec: ModelSpec
    engine: str
    base_urls: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def in_gateway(self) -> bool:
        """Run by the gateway process itself (engine: local), not behind an engine URL."""
        return self.engine == "local"


def chat_engine(config: Config, spec: ModelSpec) -> str:
    serving = config.serving
    if serving["engine"] == "ollama":
        return "ollama"
    if config.platform == "js":
        return "ollama"
    if spec.engine:
        return spec.engine
    if spec.type == "vlm":
        return "ollama"
    if "vl" in spec.name.lower():
        return "ollama"
    return serving["engine"]


def is_reranker(spec: ModelSpec) -> bool:
    return spec.type == "reranker"


def embedding_engine(spec: ModelSpec) -> str:
    """Embedding and reranker models: their own engine, else a remote OpenAI-compatible one, else local."""
    if spec.engine:
        return spec.engine
    return "openai" if spec.base_urls else "local"


def engine_urls(config: Config, spec: ModelSpec, engine: str) -> tuple[str, ...]:
    serving = config.serving
    if spec.base_urls:
        urls = spec.base_urls
    elif engine == "ollama":
        urls = (
            as_url_list(serving.get("ollama-base-url"))
            or (as_url_list(serving.get("base-url")) if serving["engine"] == "ollama" else ())
            or (OLLAMA_DEFAULT_URL,)
        )
    elif engine == "vllm":
        urls = as_url_list(serving.get("vllm-base-url")) or (f"http://{vllm_service_name(spec.name)}:{VLLM_PORT}",)
    elif engine == "openai":
        urls = as_url_list(serving.get("base-url")) if serving["engine"] == "openai" else ()
    else:
        urls = ()
    return tuple(strip_api_suffix(u, engine) for u in urls)


class Router:
    """Resolves request model names (names or aliases, chained) to Routes."""

    def __init__(self, config: Config):
        self.config = config
        self.routes: dict[str, Route] = {}
        for spec in config.models:
            engine = embedding_engine(spec) if spec.is_embedding or is_reranker(spec) else chat_engine(config, spec)
            self.routes[spec.name] = Route(spec, engine, engine_urls(config, spec, engine))
        # LoRA adapters: the base's engine and URLs, the adapter's name as the engine-side model.
        self.adapters: dict[str, Route] = {}
        for base, adapter in all_adapters(config):
            route = self.routes[base.name]
            self.adapters.setdefault(adapter.name, Route(adapter_spec(base, adapter), route.engine, route.base_urls))
        self.aliases: dict[str, str] = {}
        for alias, target in _alias_edges(config):
            self.aliases.setdefault(alias, target)
        self._lookup: dict[str, Route] = {**self.adapters, **self.routes}
        for alias in self.aliases:
            target = self.follow(alias)
            if target in self._lookup:
                self._lookup[alias] = self._lookup[target]

    def follow(self, name: str) -> str:
        seen = {name}
        while name in self.aliases and name not in self.routes and name not in self.adapters:
            name = self.aliases[name]
            if name in seen:
                break
            seen.add(name)
        return name

    def resolve(self, name: str) -> Route | None:
        return self._lookup.get(name)

    def names(self, kind: str | None = None) -> list[str]:
        """Every usable name (models then aliases), optionally only chat or only embedding ones."""
        out = []
        for name, route in self._lookup.items():
            if kind == "embedding" and not route.spec.is_embedding:
                continue
            if kind == "chat" and (route.spec.is_embedding or is_reranker(route.spec)):
                continue
            if kind == "reranker" and not is_reranker(route.spec):
                continue
            out.append(name)
        return out

    def engines(self) -> dict[tuple[str, tuple[str, ...]], list[Route]]:
        """Routes grouped by (engine, urls): what readiness must probe."""
        groups: dict[tuple[str, tuple[str, ...]], list[Route]] = {}
        for route in self.routes.values():
            groups.setdefault((route.engine, route.base_urls), []).append(route)
        return groups


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class EngineService:
    """One engine container the stack runs. Compose renders it and the gateway reaches it at `url`.

    Built from the routes' own URLs (see `stack_host`), so the service set and the gateway's URLs cannot disagree.
    """

    name: str
    kind: str  # ollama | vllm
    port: int
    models: tuple[str, ...]
    spec: ModelSpec | None = None  # the model a vLLM service serves (one model per vLLM process)

    @property
    def url(self) -> str:
        return f"http://{self.name}:{self.port}"


def _service_uses(config: Config) -> list[tuple[str, int, str, Route]]:
    """(service, port, scheme, route) for every route URL that names a service of this stack, in config order."""
    external = {h.lower() for h in config.docker.get("external-services") or ()}
    uses = []
    for route in Router(config).routes.values():
        if route.engine not in STACK_ENGINES:
            continue
        for url in route.base_urls:
            found = stack_host(url, external)
            if found:
                uses.append((found[0], found[1], urlsplit(url).scheme, route))
    return uses


def stack_services(config: Config) -> list[EngineService]:
    """The engine services this stack must run: what compose renders and what plan.json lists."""
    services: dict[str, EngineService] = {}
    for name, port, _, route in _service_uses(config):
        known = services.get(name)
        if known is None:
            services[name] = EngineService(name, route.engine, port, (route.name,),
                                           route.spec if route.engine == "vllm" else None)
        elif route.name not in known.models:
            services[name] = EngineService(known.name, known.kind, known.port, (*known.models, route.name), known.spec)
    return list(services.values())


def stack_service_issues(config: Config) -> list[ConfigIssue]:
    """A service name must mean one container: one engine kind, one port, plain http, one model per vLLM."""
    issues: list[ConfigIssue] = []
    first: dict[str, tuple[int, Route]] = {}
    for name, port, scheme, route in _service_uses(config):
        where = route.spec.pointer
        if name == GATEWAY_SERVICE:
            issues.append(ConfigIssue(where, f"model {route.name!r} points at the service name {name!r}, which is the gateway",
                                      "name the engine service something else"))
            continue
        if scheme != "http":
            issues.append(ConfigIssue(where, f"{scheme}://{name} names a service of this stack, which serves plain http",
                                      "use http://, or a full host name for an external server"))
        if name not in first:
            first[name] = (port, route)
            continue
        port0, route0 = first[name]
        if route0.engine != route.engine:
            issues.append(ConfigIssue(where, f"service {name!r} would run both {route0.engine} (for {route0.name!r}) "
                                             f"and {route.engine} (for {route.name!r})", "give each engine its own service name"))
        elif port0 != port:
            issues.append(ConfigIssue(where, f"service {name!r} is used on port {port0} and port {port}",
                                      "one service listens on one port"))
        elif route.engine == "vllm" and route0.name != route.name:
            issues.append(ConfigIssue(f"{where}/name", f"models {route0.name!r} and {route.name!r} map to the same vLLM service {name!r}",
                                      "a vLLM server serves one model: give each model its own service (unset "
                                      "vllm-base-url) or rename one model"))
    return issues


def _alias_edges(config: Config) -> Iterable[tuple[str, str]]:
    for alias, target in config.global_aliases.items():
        yield alias, target
    for spec in config.models:
        for alias in spec.aliases:
            yield alias, spec.name
    for _, adapter in all_adapters(config):
        for alias in adapter.aliases:
            yield alias, adapter.name


def semantic_issues(config: Config) -> list[ConfigIssue]:
    """Rules the schema cannot express: duplicates, alias conflicts and loops, engine/type fit, reachability."""
    issues: list[ConfigIssue] = []
    models = _model_names(config, issues)
    definitions = _alias_definitions(config)
    issues += _alias_clashes(definitions, models)
    issues += _alias_chains(definitions, models)
    for spec in config.models:
        issues += _engine_fit(config, spec)
    issues.extend(stack_service_issues(config))
    issues += cuda_issues(config, any(s.kind == "vllm" for s in stack_services(config)))
    issues += adapter_issues(config, lambda spec: chat_engine(config, spec))
    issues += _setting_issues(config)
    return issues


def _model_names(config: Config, issues: list[ConfigIssue]) -> dict[str, ModelSpec]:
    """Every model and adapter by name; a name defined twice is an issue (the first definition wins)."""
    models: dict[str, ModelSpec] = {}
    for spec in config.models:
        if spec.name in models:
            issues.append(ConfigIssue(f"{spec.pointer}/name", f"model {spec.name!r} is defined twice",
                                      f"first definition at {models[spec.name].pointer}"))
        models.setdefault(spec.name, spec)
    for base, adapter in all_adapters(config):
        if adapter.name in models:
            issues.append(ConfigIssue(f"{adapter.pointer}/name", f"adapter name {adapter.name!r} is already a model "
                                      "or adapter name", f"first definition at {models[adapter.name].pointer}"))
        models.setdefault(adapter.name, adapter_spec(base, adapter))
    return models


def _alias_definitions(config: Config) -> dict[str, list[tuple[str, str]]]:
    """Where each alias is defined (target, pointer), to report conflicts rather than let one silently win."""
    definitions: dict[str, list[tuple[str, str]]] = {}
    for alias, target in config.global_aliases.items():
        definitions.setdefault(alias, []).append((target, f"/model-aliases/{alias}"))
    for spec in config.models:
        for i, alias in enumerate(spec.aliases):
            where = f"{spec.pointer}/aliases/{i}" if spec.pointer != "/embedding" else f"/embedding/aliases/{i}"
            definitions.setdefault(alias, []).append((spec.name, where))
    for _, adapter in all_adapters(config):
        for i, alias in enumerate(adapter.aliases):
            definitions.setdefault(alias, []).append((adapter.name, f"{adapter.pointer}/aliases/{i}"))
    return definitions


def _alias_clashes(definitions: dict[str, list[tuple[str, str]]], models: Mapping[str, Any]) -> list[ConfigIssue]:
    issues = []
    for alias, defs in definitions.items():
        if alias in models:
            issues.append(ConfigIssue(defs[0][1], f"alias {alias!r} has the same name as a model",
                                      "rename the alias; a model name cannot also be an alias"))
            continue
        if len({t for t, _ in defs}) > 1:
            places = "; ".join(f"{w} -> {t!r}" for t, w in defs)
            issues.append(ConfigIssue(defs[1][1], f"alias {alias!r} is defined with different targets: {places}",
                                      "keep one definition"))
    return issues


def _alias_chains(definitions: dict[str, list[tuple[str, str]]], models: Mapping[str, Any]) -> list[ConfigIssue]:
    """Loops are errors; an alias that ends nowhere is a warning (the seed allowed it: harmless until named)."""
    issues = []
    edges = {alias: defs[0][0] for alias, defs in definitions.items() if alias not in models}
    for alias, (target, where) in ((a, d[0]) for a, d in definitions.items() if a not in models):
        chain, node = [alias], target
        while node in edges and node not in models:
            if node in chain:
                loop = " -> ".join(chain[chain.index(node):] + [node])
                issues.append(ConfigIssue(where, f"alias loop: {loop}", "point one alias at a model name"))
                break
            chain.append(node)
            node = edges[node]
        else:
            if node not in models:
                issues.append(ConfigIssue(where, f"alias {alias!r} points to {node!r}, which this config does not serve: "
                                                 "it is left out of /v1/models and a request naming it gets 404 "
                                                 "model_not_found",
                                          ("known models: " + ", ".join(sorted(models))) if models
                                          else "no models configured", severity="warning"))
    return issues


def _engine_fit(config: Config, spec: ModelSpec) -> list[ConfigIssue]:
    """One model's engine against its type, and an OpenAI-compatible engine's URL."""
    issues = stream_issues(spec.pointer, spec.params)
    if spec.is_embedding or is_reranker(spec):
        engine = embedding_engine(spec)
        if engine == "local" and not (spec.path or spec.name):
            issues.append(ConfigIssue(spec.pointer, f"local {spec.type} model needs a name or path"))
        if is_reranker(spec) and engine == "ollama":
            issues.append(ConfigIssue(f"{spec.pointer}/engine", "Ollama has no rerank API",
                                      "serve rerankers locally (engine: local, with path) or on vllm/openai"))
    else:
        engine = chat_engine(config, spec)
        if spec.engine == "local":
            issues.append(ConfigIssue(f"{spec.pointer}/engine", "engine 'local' serves embedding models only",
                                      "use ollama, vllm or openai for chat models"))
    if engine == "openai" and not engine_urls(config, spec, engine):
        issues.append(ConfigIssue(spec.pointer, f"model {spec.name!r} uses an OpenAI-compatible engine with no URL",
                                  "set base-url on the model, or serving.base-url with serving.engine: openai"))
    return issues


def _setting_issues(config: Config) -> list[ConfigIssue]:
    issues = []
    emb = config.embedding
    if emb.get("enabled") and not emb.get("model"):
        issues.append(ConfigIssue("/embedding", "embedding.enabled is true but embedding.model is not set",
                                  "name the embedding model (or set enabled: false)"))
    docker = config.docker
    if docker["publish-engine-ports"] and not _loopback(docker["engine-bind"]) and stack_services(config):
        issues.append(ConfigIssue("/docker/engine-bind",
                                  f"engine ports are published on {docker['engine-bind']}: engines have no authentication",
                                  "keep engine-bind on 127.0.0.1 and reach models through the gateway", severity="warning"))
    if config.serving["engine"] == "vllm" and config.serving.get("base-url") and not config.serving.get("vllm-base-url"):
        issues.append(ConfigIssue("/serving/base-url",
                                  "serving.base-url is not used for vllm models: each gets its own service",
                                  "set serving.vllm-base-url to send every vllm model to one server", severity="warning"))
    return issues
