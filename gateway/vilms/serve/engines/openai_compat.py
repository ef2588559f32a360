"""OpenAI-compatible engines (vLLM, llama.cpp server, any /v1 server): bytes pass straight through."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import orjson
from starlette.responses import Response

from vilms.errors import BackendError, GatewayError
from vilms.serve.departure import LeaveWatch
from vilms.serve.observe import Observation
from vilms.config.routing import Route
from vilms.serve.large import forwarded
from vilms.serve.engines.base import ChatCall, EmbedResult, Engine, ErrorEvents
from vilms.serve.upstream import Reply, Upstream

SSE_RAW_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no"))


class EngineJSON(Response):
    """An engine's JSON answer relayed as its own bytes, headers made by hand (Response.__init__ renders and scans
    them for every answer)."""

    media_type = "application/json"

    def __init__(self, body: bytes):
        self.body, self.status_code, self.background = body, 200, None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]


class RelayStream(Response):
    """An engine's stream relayed to the client chunk by chunk, as `ObservedStream` does, minus its cost.

    Starlette's StreamingResponse opens an anyio task group per stream (two tasks, cancel scopes, a task repr):
    ~15% of a streamed request's gateway CPU (py-spy, c=64). Here the sending task is cancelled when the client
    goes away (vilms.serve.departure), and closing the relay generator closes the upstream (the engine stops
    generating).
    A stream whose body never started is still finished (499) and its upstream closed.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], obs: Observation, upstream: Reply):
        self.body_iterator, self.obs, self.upstream = body, obs, upstream
        self.status_code = 200
        self.background = None
        self.raw_headers = list(SSE_RAW_HEADERS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = LeaveWatch(scope, receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            watch.task.uncancel()
        finally:
            watch.stop()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if not self.obs.done:
                self.upstream.close()
                self.obs.finish(499, "client_closed")

class OpenAICompatEngine(Engine):
    """Forwards the request body (model renamed, defaults filled) and relays the answer unparsed.

    Non-streaming answers are returned as the engine's own bytes; streams are relayed chunk by
    chunk as they arrive, so the gateway adds no buffering and no re-serialisation.
    """

    kind = "openai"

    def __init__(self, upstream: Upstream, total_timeout: float, kind: str = "openai"):
        super().__init__(upstream, total_timeout)
        self.kind = kind
        # vLLM logs the caller's x-request-id; a generic server may not take it (llama-cpp-python's answers a
        # non-UUID id with a bare 400), so only vLLM gets it.
        self.forwards_request_id = kind == "vllm"
        self.lists_names = kind == "vllm"  # a generic server (a proxy, llama.cpp) is judged by answering alone

    forwarded = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/rerank"})

    async def chat(self, call: ChatCall) -> Response:
        return await self.forward(call, "/v1/chat/completions")

    async def forward(self, call: ChatCall, path: str) -> Response:
        """POST the body to the engine's own `path` (chat, responses, completions, rerank) and relay the answer."""
        payload = await forwarded(call.body)  # a large body: serialised in the body thread, in short calls
        urls = call.route.base_urls
        if not call.stream:
            body = await self.post_json(call.obs, urls, path, payload)
            call.obs.finish(200)
            return EngineJSON(body)
        upstream = await self.open_with_deadline(call.obs, urls, path, payload)
        return RelayStream(self.relay(call, upstream, ErrorEvents(self.max_line)), call.obs, upstream)

    async def embed(self, route: Route, inputs: list[str], dimensions: int | None) -> EmbedResult:
        request: dict = {"model": route.name, "input": inputs, "encoding_format": "float"}
        if dimensions is not None:
            request["dimensions"] = dimensions
        obs = Observation("embeddings-upstream", "-", route.name, self.kind)
        body = await self.post_json(obs, route.base_urls, "/v1/embeddings", orjson.dumps(request))
        try:
            data = orjson.loads(body)
            rows = sorted(data["data"], key=lambda row: row["index"])
            vectors = [row["embedding"] for row in rows]
            tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendError(f"{self.kind} engine returned an embeddings answer of unknown shape") from exc
        if len(vectors) != len(inputs):
            raise BackendError(f"{self.kind} engine returned {len(vectors)} vectors for {len(inputs)} inputs")
        return EmbedResult(vectors, tokens)

    async def complete(self, call: ChatCall) -> Response:
        return await self.forward(call, "/v1/completions")

    def listed(self, data: Any) -> frozenset[str]:
        return frozenset(row["id"] for row in data["data"])


__all__ = ["OpenAICompatEngine", "GatewayError"]
