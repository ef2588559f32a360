"""FastAPI application: thin routes over the router, engines and embedders held in GatewayState."""

from __future__ import annotations

import asyncio
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

from vilms.config.model import Config
from vilms.serve.embeddings.response import embedding_body, plain_embedding_request, texts_from_input
from vilms.serve.engines import ChatCall
from vilms.errors import BadRequest, GatewayError, scrub
from vilms.serve.media import inspect_content, prepare_images
from vilms.serve.observe import REGISTRY, Observation
from vilms.config.params import apply_defaults, clamp_tokens, enforce_policy, request_stream
from vilms.serve.tokens import decode_token_input
from vilms.serve.api import completions as completions_api
from vilms.serve.api import rerank as rerank_api
from vilms.serve.api import responses as responses_api
from vilms.serve.api.guard import Admitted, Guard, caller_request_id
from vilms.serve.api.openapi import describe
from vilms.serve.api.requests import ChatRequest, EmbeddingRequest, parse_json, read_body, validated
from vilms.serve.api.state import GatewayState

Handler = Callable[[dict[str, Any], GatewayState, Observation, "Admitted"], Awaitable[Response]]

JSON = "application/json"
log = logging.getLogger("vilms.gateway")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type=JSON,
                    headers=headers)


def _error(exc: GatewayError, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    if exc.status >= 500:  # engine and loader messages may name hosts or paths
        exc.message = scrub(exc.message)
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=headers or None)


def _internal(path: str, request_id: str, obs: Observation | None = None) -> Response:
    """Any unexpected exception: the traceback in the error log, the request finished and counted, an envelope."""
    log.exception("unhandled error", extra={"fields": {"path": path, "request_id": request_id}})
    if obs is not None:
        obs.finish(500, "internal_error")
    return _error(GatewayError("internal error in the gateway", status=500, type="server_error"), request_id)


_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _request_id(request: Request) -> str:
    """The caller's x-request-id when short and plain, else a process-unique id (a counter: uuid4 per
    request cost 5% of CPU)."""
    return caller_request_id(request.headers.get("x-request-id")) or f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work` in this task, which a watcher cancels (and so the upstream request) if the client goes away first.

    One watcher task and no asyncio.wait: running `work` as a second task and waiting on both cost ~7% of a
    proxied request's gateway CPU (py-spy, c=64)."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request.receive)
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        current.uncancel()
        raise GatewayError("client closed the connection", status=499, type="client_closed") from None
    finally:
        watcher.cancel()


def _tag(response: Response, request_id: str) -> Response:
    """The request id on the response, appended to its raw headers (`response.headers[...] = ...` builds a
    MutableHeaders and scans the list each time). Ids are plain ASCII (`caller_request_id` or a counter)."""
    response.raw_headers.append((b"x-request-id", request_id.encode("latin-1")))
    return response


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class HotPath:
    """Serves the hot POST routes straight from ASGI, skipping FastAPI's middleware stack.

    Measured: FastAPI's middleware and routing cost about 30% of the gateway's CPU per proxied request.
    The handlers are the same functions FastAPI registers; every other route goes through FastAPI.
    """

    def __init__(self, app: FastAPI, routes: dict[str, Callable[[Request], Awaitable[Response]]], guard: Guard):
        self.app = app
        self.routes = routes
        self.state = app.state
        self.keys = guard.keys
        self.guard = guard

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                handler = self.routes.get(scope["path"])
                if handler is not None:
                    try:
                        response = await handler(Request(scope, receive))
                    except Exception:  # handlers catch their own; this is the last line of defence
                        response = _internal(scope["path"], "-")
                    await response(scope, receive, send)
                    return
            if self.keys.enabled and (scope["path"].startswith("/v1/") or scope["path"] in _KEYED):
                # secure by default: any other /v1/* route (present or added later) needs a key too
                try:
                    key = self.keys.authenticate(_header(scope, b"authorization"))
                    if scope["path"] in _DOCS and not self.guard.sees_everything(key):  # it names every model
                        raise GatewayError("the API description needs a key that is not scoped to some models",
                                           status=403, type="permission_error", code="admin_key_required")
                except GatewayError as exc:
                    await _error(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


_DOCS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})
_KEYED = _DOCS | {"/metrics"}  # + every /v1/*


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def create_app(config: Config) -> HotPath:
    state = GatewayState.build(config)
    guard = Guard(config, state.router)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.stop()
        guard.close()

    docs = bool(config.gateway["openapi"])
    app = FastAPI(title="vilms gateway", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.gateway = state
    app.state.guard = guard
    router = state.router

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        allow = (exc.headers or {}).get("Allow", "")
        if exc.status_code == 405 and allow == "POST":
            message = f"{request.url.path} takes POST with a JSON body; see the OpenAI API reference"
        response = _error(GatewayError(message, status=exc.status_code, type=kind,
                                       code="method_not_allowed" if exc.status_code == 405 else None))
        response.headers.update(exc.headers or {})  # Allow on every 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return _internal(request.url.path, "-")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(BadRequest(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.get("/health_check")
    async def health_check() -> Response:
        return _json({"status": "ok"})

    @app.get("/health/ready")
    async def health_ready(request: Request) -> Response:
        report = await state.readiness()
        status = 200 if report["status"] == "ready" else 503
        if guard.keys.enabled:  # without a key, or with one scoped to some models: the verdict only
            try:
                if not guard.sees_everything(guard.authorize_read(request)):
                    return _json({"status": report["status"]}, status=status)
            except GatewayError:
                return _json({"status": report["status"]}, status=status)
        return _json(report, status=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not guard.sees_everything(guard.authorize_read(request)):  # labels name every model and key
            raise GatewayError("/metrics needs a key that is not scoped to some models", status=403,
                               type="permission_error", code="admin_key_required")
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        key = guard.authorize_read(request)
        data = []
        for name, route in router.routes.items():
            if key is None or key.allows(name):
                data.append({"id": name, "object": "model", "created": state.started, "owned_by": "vilms",
                             "type": route.spec.type, "engine": route.engine})
        for name, route in router.adapters.items():
            if key is None or key.allows(name):
                data.append({"id": name, "object": "model", "created": state.started, "owned_by": "vilms",
                             "type": route.spec.type, "engine": route.engine, "parent": route.spec.parent})
        for alias in router.aliases:
            route = router.resolve(alias)
            if route is not None and (key is None or key.allows(route.name)):
                data.append({"id": alias, "object": "model", "created": state.started, "owned_by": "vilms",
                             "type": route.spec.type, "engine": route.engine, "alias_of": route.name})
        return _json({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str) -> Response:
        """One entry of /v1/models (openai's `client.models.retrieve`); ids may hold slashes (Qwen/Qwen3-4B)."""
        key = guard.authorize_read(request)
        route = router.resolve(model_id)
        if route is None or (key is not None and not key.allows(route.name)):
            raise guard.not_found(key, model_id)
        entry = {"id": model_id, "object": "model", "created": state.started, "owned_by": "vilms",
                 "type": route.spec.type, "engine": route.engine}
        if route.spec.parent:
            entry["parent"] = route.spec.parent
        return _json(entry if model_id == route.name else {**entry, "alias_of": route.name})

    def served(path: str, kind: str, handler: Handler) -> None:
        """A POST route whose handler lives in its own module: the same guard, body budget, request id, metrics
        and envelopes as chat; the handler gets the parsed body and what it still owes (model scope, caps, slot)."""
        async def route(request: Request) -> Response:
            request_id = _request_id(request)
            obs = Observation(kind, request_id)
            hold = None
            try:
                key = guard.admit(request, obs)
                hold = guard.hold(key)
                raw = await read_body(request, guard.body_limit, hold, guard.body_timeout)
                body = parse_json(raw, guard.max_nodes)
                # cancelled (upstream call included) when the caller leaves, stream or not
                response = await _until_disconnect(request, handler(body, state, obs, Admitted(guard, key)))
            except GatewayError as exc:
                obs.finish(exc.status, exc.code or "")
                return _error(exc, request_id)
            except Exception:
                return _internal(path, request_id, obs)
            finally:
                if hold is not None:
                    hold.release()
            return _tag(response, request_id)
        app.add_api_route(path, route, methods=["POST"])
        hot[path] = route

    hot: dict[str, Callable[[Request], Awaitable[Response]]] = {}
    served("/v1/responses", "responses", responses_api.handle)
    served("/v1/rerank", "rerank", rerank_api.handle)
    served("/v1/completions", "completions", completions_api.handle)
    served("/rerank", "rerank", rerank_api.handle)

    async def chat_completions(request: Request) -> Response:
        request_id = _request_id(request)
        obs = Observation("chat", request_id)
        hold = None
        try:
            key = guard.admit(request, obs)
            hold = guard.hold(key)
            raw = await read_body(request, guard.body_limit, hold, guard.body_timeout)
            body = parse_json(raw, guard.max_nodes)
            parsed = validated(ChatRequest, body, guard.context)
            route = router.resolve(parsed.model)
            if route is None:
                raise guard.not_found(key, parsed.model, "chat")
            if route.spec.is_embedding or route.spec.type == "reranker":
                raise BadRequest(f"{parsed.model!r} is a {route.spec.type} model, not a chat model; use /v1/embeddings "
                                 "or /v1/rerank", param="model")
            guard.allow_model(key, route, parsed.model)
            obs.bind(route.name, route.engine)
            extras = state.extras[route.name]
            policy = guard.policies[route.name]
            enforce_policy(parsed.model_extra, parsed.n, policy)
            body["model"] = route.name
            apply_defaults(body, extras.defaults, extras.max_tokens)
            clamp_tokens(body, policy)
            limits = extras.image_limits
            if inspect_content(body["messages"], guard.part_types[route.name], limits.max_frames, guard.max_images):
                body["messages"] = await prepare_images(body["messages"], limits, state.fetcher, guard.decoder, obs.key)
            await guard.slot(route, obs)
            stream = request_stream(body, extras.stream)
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
        except Exception:
            return _internal("/v1/chat/completions", request_id, obs)
        finally:
            if hold is not None:
                hold.release()
        return _tag(response, request_id)

    async def embeddings(request: Request) -> Response:
        request_id = _request_id(request)
        obs = Observation("embeddings", request_id)
        hold = None
        try:
            key = guard.admit(request, obs)
            hold = guard.hold(key)
            raw = await read_body(request, guard.body_limit, hold, guard.body_timeout)
            body = parse_json(raw, guard.max_nodes)
            parsed = plain_embedding_request(body) or validated(EmbeddingRequest, body)
            route = router.resolve(parsed.model)
            if route is None:
                names = router.names("embedding")
                emb = config.embedding
                if not names or (parsed.model == emb.get("model") and not emb.get("enabled")):
                    raise BadRequest("embeddings are disabled on this gateway (embedding.enabled: false and no "
                                     "type: embedding models)", code="embeddings_disabled", param="model")
                raise guard.not_found(key, parsed.model, "embedding")
            if not route.spec.is_embedding:
                raise BadRequest(f"{parsed.model!r} is a chat model; use /v1/chat/completions", param="model")
            guard.allow_model(key, route, parsed.model)
            texts = texts_from_input(await decode_token_input(parsed.input))
            obs.bind(route.name, route.engine)
            await guard.slot(route, obs)
            if route.engine == "local":
                vectors, tokens = await state.embedders[route.name].embed(texts, parsed.dimensions,
                                                                          route.spec.matryoshka)
            else:
                result = await state.engines[route.engine].embed(route, texts, parsed.dimensions)
                vectors, tokens = np.asarray(result.vectors, dtype=np.float32), result.prompt_tokens
            response = _tag(Response(embedding_body(parsed.model, vectors, tokens, parsed.encoding_format),
                                     media_type=JSON), request_id)
        except GatewayError as exc:
            obs.finish(exc.status, exc.code or "")
            return _error(exc, request_id)
        except Exception:
            return _internal("/v1/embeddings", request_id, obs)
        finally:
            if hold is not None:
                hold.release()
        obs.finish(200)
        return response

    # Registered for routing (405 + Allow for other methods) and the OpenAPI description; HotPath serves POST.
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.openapi = lambda: describe(app, router)  # type: ignore[method-assign]
    return HotPath(app, {"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings, **hot}, guard)

