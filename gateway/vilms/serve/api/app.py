"""FastAPI application: the hot POST routes served straight from ASGI through one pipeline, the rest by FastAPI."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vilms.config.model import Config
from vilms.errors import BadRequest, GatewayError
from vilms.serve.api import chat as chat_api
from vilms.serve.api import completions as completions_api
from vilms.serve.api import embeddings as embeddings_api
from vilms.serve.api import rerank as rerank_api
from vilms.serve.api import responses as responses_api
from vilms.serve.api.guard import Guard
from vilms.serve.api.openapi import describe
from vilms.serve.api.pipeline import Handler, Pipeline, error_response, internal_error
from vilms.serve.api.reads import add_read_routes
from vilms.serve.api.state import GatewayState


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
                        response = internal_error(scope["path"], "-")
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
                    await error_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


_DOCS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})
_KEYED = _DOCS | {"/metrics"}  # + every /v1/*


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


# Every POST route: (path, metric kind, handler). Order = the OpenAPI description's.
POST_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("/v1/responses", "responses", responses_api.handle),
    ("/v1/rerank", "rerank", rerank_api.handle),
    ("/v1/completions", "completions", completions_api.handle),
    ("/rerank", "rerank", rerank_api.handle),
    ("/v1/chat/completions", "chat", chat_api.handle),
    ("/v1/embeddings", "embeddings", embeddings_api.handle),
)


def create_app(config: Config, after_start: Callable[[], None] | None = None) -> HotPath:
    """`after_start` runs once the state has started (the server's factory settles the heap there: serve/heap.py)."""
    state = GatewayState.build(config)
    guard = Guard(config, state.router)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        if after_start is not None:
            after_start()
        yield
        await state.stop()
        guard.close()

    docs = bool(config.gateway["openapi"])
    app = FastAPI(title="vilms gateway", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.gateway, app.state.guard = state, guard
    add_error_handlers(app)
    add_read_routes(app, state, guard)
    pipeline, hot = Pipeline(guard, state), {}
    for path, kind, handler in POST_ROUTES:
        # registered with FastAPI for routing (405 + Allow) and the OpenAPI description; HotPath serves the POSTs
        hot[path] = pipeline.endpoint(path, kind, handler)
        app.add_api_route(path, hot[path], methods=["POST"])
    app.openapi = lambda: describe(app, state.router)  # type: ignore[method-assign]
    return HotPath(app, hot, guard)


def add_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI itself raises (unknown path, wrong method, validation) as an OpenAI envelope."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        allow = (exc.headers or {}).get("Allow", "")
        if exc.status_code == 405 and allow == "POST":
            message = f"{request.url.path} takes POST with a JSON body; see the OpenAI API reference"
        response = error_response(GatewayError(message, status=exc.status_code, type=kind,
                                               code="method_not_allowed" if exc.status_code == 405 else None))
        response.headers.update(exc.headers or {})  # Allow on every 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.url.path, "-")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(BadRequest(str(exc.errors()[0].get("msg", "invalid request"))))
