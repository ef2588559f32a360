"""FastAPI application: thin routes over the router, engines and embedders held in GatewayState."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..config import Config
from ..engines import ChatCall
from ..errors import BadRequest, GatewayError, ModelNotFound
from ..media import has_images, prepare_images
from ..observe import REGISTRY, Observation
from ..params import apply_defaults
from ..tokens import decode_token_input
from . import completions as completions_api
from . import rerank as rerank_api
from . import responses as responses_api
from .requests import ChatRequest, EmbeddingRequest, parse_json, read_body, validated
from .state import GatewayState

Handler = Callable[[Request, GatewayState, Observation, int], Awaitable[Response]]

JSON = "application/json"
log = logging.getLogger("vilms.gateway")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type=JSON,
                    headers=headers)


def _error(exc: GatewayError, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else None
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=headers)


_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _request_id(request: Request) -> str:
    """The caller's x-request-id, else a process-unique id (a counter: uuid4 per request cost 5% of CPU)."""
    return request.headers.get("x-request-id") or f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (and so the upstream request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise GatewayError("client closed the connection", status=499, type="client_closed")


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class HotPath:
    """Serves the hot POST routes straight from ASGI, skipping FastAPI's middleware stack.

    Measured: FastAPI's middleware and routing cost about 30% of the gateway's CPU per proxied request.
    The handlers are the same functions FastAPI registers; every other route goes through FastAPI.
    """

    def __init__(self, app: FastAPI, routes: dict[str, Callable[[Request], Awaitable[Response]]]):
        self.app = app
        self.routes = routes
        self.state = app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                try:
                    response = await handler(Request(scope, receive))
                except Exception:  # never a bare 500 page: an envelope, and the traceback in the log
                    log.exception("unhandled error", extra={"fields": {"path": scope["path"]}})
                    response = _error(GatewayError("internal error in the gateway", status=500, type="server_error"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: Config) -> HotPath:
    state = GatewayState.build(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.stop()

    app = FastAPI(title="vilms gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state
    router = state.router
    body_limit = config.gateway["max-request-bytes"]

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(GatewayError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                                   type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"fields": {"path": request.url.path}})
        return _error(GatewayError("internal error in the gateway", status=500, type="server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(BadRequest(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.get("/health_check")
    async def health_check() -> Response:
        return _json({"status": "ok"})

    @app.get("/health/ready")
    async def health_ready() -> Response:
        report = await state.readiness()
        return _json(report, status=200 if report["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        data = []
        for name, route in router.routes.items():
            data.append({"id": name, "object": "model", "created": state.started, "owned_by": "vilms",
                         "type": route.spec.type, "engine": route.engine})
        for name, route in router.adapters.items():
            data.append({"id": name, "object": "model", "created": state.started, "owned_by": "vilms",
                         "type": route.spec.type, "engine": route.engine, "parent": route.spec.parent})
        for alias in router.aliases:
            route = router.resolve(alias)
            if route is not None:
                data.append({"id": alias, "object": "model", "created": state.started, "owned_by": "vilms",
                             "type": route.spec.type, "engine": route.engine, "alias_of": route.name})
        return _json({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        """One entry of /v1/models (openai's `client.models.retrieve`); ids may hold slashes (Qwen/Qwen3-4B)."""
        route = router.resolve(model_id)
        if route is None:
            raise ModelNotFound(model_id, router.names())
        entry = {"id": model_id, "object": "model", "created": state.started, "owned_by": "vilms",
                 "type": route.spec.type, "engine": route.engine}
        if route.spec.parent:
            entry["parent"] = route.spec.parent
        return _json(entry if model_id == route.name else {**entry, "alias_of": route.name})

    def method_hint(path: str) -> Callable[[], Awaitable[Response]]:
        async def hint() -> Response:
            exc = GatewayError(f"{path} takes POST with a JSON body; see the OpenAI API reference", status=405,
                               code="method_not_allowed")
            return Response(exc.body(), status_code=405, media_type=JSON, headers={"allow": "POST"})
        return hint

    app.add_api_route("/v1/chat/completions", method_hint("/v1/chat/completions"), methods=["GET"])
    app.add_api_route("/v1/embeddings", method_hint("/v1/embeddings"), methods=["GET"])

    def served(path: str, kind: str, handler: Handler) -> None:
        """A POST route whose handler lives in its own module: request id, metrics, envelopes as chat has."""
        async def route(request: Request) -> Response:
            request_id = _request_id(request)
            obs = Observation(kind, request_id)
            try:
                response = await handler(request, state, obs, body_limit)
            except GatewayError as exc:
                obs.finish(exc.status, exc.code or "")
                return _error(exc, request_id)
            response.headers["x-request-id"] = request_id
            return response
        app.add_api_route(path, route, methods=["POST"])
        app.add_api_route(path, method_hint(path), methods=["GET"])

    served("/v1/responses", "responses", responses_api.handle)
    served("/v1/rerank", "rerank", rerank_api.handle)
    served("/v1/completions", "completions", completions_api.handle)
    served("/rerank", "rerank", rerank_api.handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = _request_id(request)
        obs = Observation("chat", request_id)
        try:
            body = parse_json(await read_body(request, body_limit))
            parsed = validated(ChatRequest, body)
            route = router.resolve(parsed.model)
            if route is None:
                raise ModelNotFound(parsed.model, router.names("chat"))
            if route.spec.is_embedding or route.spec.type == "reranker":
                raise BadRequest(f"{parsed.model!r} is a {route.spec.type} model, not a chat model; use /v1/embeddings "
                                 "or /v1/rerank",
                                 param="model")
            obs.bind(route.name, route.engine)
            extras = state.extras[route.name]
            body["model"] = route.name
            apply_defaults(body, extras.defaults, extras.max_tokens)
            if has_images(body["messages"]):
                body["messages"] = await prepare_images(body["messages"], extras.image_limits, state.fetcher)
            stream = bool(parsed.stream)
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            call = ChatCall(route, body, obs, stream=stream, include_usage=include_usage)
            engine = state.engines[route.engine]
            if stream:
                response = await engine.chat(call)
            else:
                response = await _until_disconnect(request, engine.chat(call))
        except GatewayError as exc:
            obs.finish(exc.status, exc.code or "")
            return _error(exc, request_id)
        response.headers["x-request-id"] = request_id
        return response

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        request_id = _request_id(request)
        obs = Observation("embeddings", request_id)
        try:
            parsed = validated(EmbeddingRequest, parse_json(await read_body(request, body_limit)))
            route = router.resolve(parsed.model)
            if route is None:
                names = router.names("embedding")
                emb = config.embedding
                if not names or (parsed.model == emb.get("model") and not emb.get("enabled")):
                    raise BadRequest("embeddings are disabled on this gateway (embedding.enabled: false and no "
                                     "type: embedding models)", code="embeddings_disabled", param="model")
                raise ModelNotFound(parsed.model, names)
            if not route.spec.is_embedding:
                raise BadRequest(f"{parsed.model!r} is a chat model; use /v1/chat/completions", param="model")
            texts = _texts(await decode_token_input(parsed.input))
            obs.bind(route.name, route.engine)
            if route.engine == "local":
                embedder = state.embedders[route.name]
                if embedder.model is None:
                    await embedder.load()
                embedder.check_dimensions(parsed.dimensions, route.spec.matryoshka)
                vectors, tokens = await embedder.embed(texts)
                if parsed.dimensions is not None and parsed.dimensions < vectors.shape[1]:
                    vectors = vectors[:, : parsed.dimensions]
                    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            else:
                result = await state.engines[route.engine].embed(route, texts, parsed.dimensions)
                vectors, tokens = np.asarray(result.vectors, dtype=np.float32), result.prompt_tokens
            response = _json(_embedding_response(parsed.model, vectors, tokens, parsed.encoding_format),
                             headers={"x-request-id": request_id})
        except GatewayError as exc:
            obs.finish(exc.status, exc.code or "")
            return _error(exc, request_id)
        obs.finish(200)
        return response

    return HotPath(app, {"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings})


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise BadRequest("input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("input must be a string or a list of strings (token arrays are not accepted)", param="input")
    for i, text in enumerate(texts):
        if not text:
            raise BadRequest(f"input[{i}] is an empty string", param="input")
    if len(texts) > 2048:
        raise BadRequest("at most 2048 inputs per request", param="input")
    return texts


def _embedding_response(model: str, vectors: np.ndarray, tokens: int, encoding: str) -> dict[str, Any]:
    if encoding == "base64":
        rows: list[Any] = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                           for v in vectors]
    else:
        rows = list(vectors)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
