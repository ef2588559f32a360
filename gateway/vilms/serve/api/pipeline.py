"""The one road every POST route runs.

    key → body budget → parse → [route: validate → resolve → policy/caps → media → slot → engine call] → relay → observe

`Pipeline.endpoint` owns the parts every route shares (request id, key and content type, the caller's share of the
body budget, the bounded read, the JSON node cap, cancellation when the caller leaves, envelopes, metrics); a route
is one `Handler` that declares only what differs — its request model, how it calls the engine, its answer's shape —
and reaches the per-model checks through `Admitted`. Nothing here branches on a route or an engine's name.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from vilms.config.params import RequestPolicy, apply_defaults, clamp_tokens, request_stream
from vilms.config.routing import Route
from vilms.errors import BadRequest, GatewayError, ModelNotFound, scrub
from vilms.serve.departure import LeaveWatch
from vilms.serve.engines import ChatCall, Engine
from vilms.serve.media import inspect_content, prepare_images
from vilms.serve.observe import Observation
from vilms.serve.api.guard import Guard, caller_request_id, head_fields
from vilms.serve.api.bodies import LARGE
from vilms.serve.api.requests import parse_body, read_body
from vilms.serve.large import Bodies, Large
from vilms.serve.api.state import GatewayState

JSON = "application/json"
log = logging.getLogger("vilms.gateway")
_USE = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "reranker": "/v1/rerank"}


def kind_of(route: Route) -> str:
    """What a model serves: chat (LLM, VLM, adapters), embedding or reranker."""
    if route.spec.type == "reranker":
        return "reranker"
    return "embedding" if route.spec.is_embedding else "chat"


class Admitted:
    """A request the pipeline let in (key, content type, body budget): the per-model checks it still owes, the
    same for every route — model scope, operator caps, defaults, image checks, a slot at the backend."""

    __slots__ = ("guard", "state", "key", "obs")

    def __init__(self, guard: Guard, state: GatewayState, key: Any, obs: Observation):
        self.guard, self.state, self.key, self.obs = guard, state, key, obs

    @property
    def owner(self) -> str:
        """Whose share of the shared pools (decode, fetch, body budget) this request uses."""
        return self.key.name if self.key is not None else ""

    def not_found(self, asked: str, kind: str | None = None) -> ModelNotFound:
        return self.guard.not_found(self.key, asked, kind)

    def resolve(self, asked: str, want: str, path: str) -> Route:
        """`asked` (model, alias or adapter) as a route of kind `want` this key may use; metrics bound to it."""
        route = self.state.router.resolve(asked)
        if route is None:
            raise self.not_found(asked, want)
        return self.accept(route, asked, want, path)

    def accept(self, route: Route, asked: str, want: str, path: str) -> Route:
        kind = kind_of(route)
        if kind != want:
            raise BadRequest(f"{asked!r} is a {route.spec.type} model; {path} serves {want} models (use {_USE[kind]})",
                             param="model")
        self.guard.allow_model(self.key, route, asked)
        self.obs.bind(route.name, route.engine)
        return route

    def policy(self, route: Route) -> RequestPolicy:
        return self.guard.policies[route.name]

    def fill(self, route: Route, body: dict[str, Any]) -> None:
        """The engine-side model name, the model's default params, and the operator's token ceiling."""
        extras = self.state.extras[route.name]
        body["model"] = route.name
        apply_defaults(body, extras.defaults, extras.max_tokens)
        clamp_tokens(body, self.policy(route))

    async def images(self, route: Route, messages: list[dict[str, Any]],
                     large: Large | None = None) -> list[dict[str, Any]]:
        """Chat-shaped messages with every image checked (part types, count, frames) and, if any, decoded,
        verified and resized off the event loop; messages without images come back as they were. `large`: the
        body that took the large road (its parts are passed over in the body thread, 60,000 parts: ~10 ms; its
        kept image URL literals are decoded from where they lie)."""
        guard, limits = self.guard, self.state.extras[route.name].image_limits
        check = (messages, guard.part_types[route.name], limits.max_frames, guard.max_images)
        if not (await Bodies.run(inspect_content, *check) if large is not None else inspect_content(*check)):
            return messages
        prepared = await prepare_images(messages, limits, self.state.fetcher, guard.decoder, self.owner,
                                        large.literal if large is not None and large.images else None)
        if large is not None and large.images:
            large.images_used()
        return prepared

    async def slot(self, route: Route) -> None:
        await self.guard.slot(route, self.obs)

    def engine(self, route: Route) -> Engine:
        return self.state.engines[route.engine]

    def generation(self, route: Route, body: dict[str, Any], stream_options: Any) -> ChatCall:
        """The engine call for a text-generating request: streamed when the body (or the model's default) says so,
        with a usage chunk when the caller asked for one."""
        include_usage = bool(stream_options and stream_options.include_usage)
        stream = request_stream(body, self.state.extras[route.name].stream)
        return ChatCall(route, body, self.obs, stream=stream, include_usage=include_usage)


Handler = Callable[[dict[str, Any], Admitted], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class Pipeline:
    """Makes each POST route's endpoint from its handler: the shared steps in one place, written once."""

    def __init__(self, guard: Guard, state: GatewayState):
        self.guard, self.state = guard, state

    def endpoint(self, path: str, kind: str, handler: Handler) -> Endpoint:
        """The handler (images, slot, engine call, a place in an embedding batch) is cancelled when the caller
        leaves, stream or not: the upstream request is closed and the request counted as 499."""
        guard, state = self.guard, self.state
        texts = kind == "chat"  # chat bodies keep long message texts as the client's literals (api.bodies.Large)

        async def endpoint(request: Request) -> Response:
            fields = head_fields(request.scope)
            request_id = _request_id(fields.get(b"x-request-id"))
            obs = Observation(kind, request_id)
            hold = None
            try:
                key = guard.admit(fields, obs)
                hold = guard.hold(key)
                raw = await read_body(request, guard.body_limit, hold, guard.body_timeout)
                body = await parse_body(raw, guard.max_nodes, texts)
                if len(raw) >= LARGE:  # its last reference goes to the body thread: 64 MiB freed there, not here
                    held = [raw]
                    del raw
                    Bodies.executor.submit(held.clear)
                response = await until_disconnect(request, handler(body, Admitted(guard, state, key, obs)))
            except GatewayError as exc:
                obs.finish(exc.status, exc.code or "")
                return error_response(exc, request_id)
            except Exception:
                return internal_error(path, request_id, obs)
            finally:
                if hold is not None:
                    hold.release()
            response.raw_headers.append((b"x-request-id", request_id.encode("latin-1")))  # plain ASCII ids only
            return response
        return endpoint


def error_response(exc: GatewayError, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    if exc.status >= 500:  # engine and loader messages may name hosts or paths
        exc.message = scrub(exc.message)
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=headers or None)


def internal_error(path: str, request_id: str, obs: Observation | None = None) -> Response:
    """Any unexpected exception: the traceback in the error log, the request finished and counted, an envelope."""
    log.exception("unhandled error", extra={"fields": {"path": path, "request_id": request_id}})
    if obs is not None:
        obs.finish(500, "internal_error")
    return error_response(GatewayError("internal error in the gateway", status=500, type="server_error"), request_id)


_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _request_id(given: bytes | None) -> str:
    """The caller's x-request-id when short and plain, else a process-unique id (a counter: uuid4 per
    request cost 5% of CPU)."""
    kept = caller_request_id(given.decode("latin-1")) if given is not None else None
    return kept or f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work` in this task, cancelled (and so the upstream request) if the client goes away first.

    No second task and no asyncio.wait: running `work` as a second task and waiting on both cost ~7% of a proxied
    request's gateway CPU (py-spy, c=64); a task parked on receive() ~4% more (vilms.serve.departure)."""
    watch = LeaveWatch(request.scope, request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        watch.task.uncancel()
        raise GatewayError("client closed the connection", status=499, type="client_closed") from None
    finally:
        watch.stop()
