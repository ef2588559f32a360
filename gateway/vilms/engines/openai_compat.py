"""OpenAI-compatible engines (vLLM, llama.cpp server, any /v1 server): bytes pass straight through."""

from __future__ import annotations

import aiohttp
import orjson
from starlette.responses import Response

from ..errors import BackendError, GatewayError
from ..observe import Observation
from ..routing import Route
from .base import ChatCall, EmbedResult, Engine, sse_response

class OpenAICompatEngine(Engine):
    """Forwards the request body (model renamed, defaults filled) and relays the answer unparsed.

    Non-streaming answers are returned as the engine's own bytes; streams are relayed chunk by
    chunk as they arrive, so the gateway adds no buffering and no re-serialisation.
    """

    kind = "openai"

    def __init__(self, session: aiohttp.ClientSession, total_timeout: float, kind: str = "openai"):
        super().__init__(session, total_timeout)
        self.kind = kind
        # vLLM logs the caller's x-request-id; a generic server may not take it (llama-cpp-python's answers a
        # non-UUID id with a bare 400), so only vLLM gets it.
        self.forwards_request_id = kind == "vllm"

    async def chat(self, call: ChatCall) -> Response:
        return await self.forward(call, "/v1/chat/completions")

    async def forward(self, call: ChatCall, path: str) -> Response:
        """POST the body to the engine's own `path` (chat, responses, completions, rerank) and relay the answer."""
        payload = orjson.dumps(call.body)
        urls = call.route.base_urls
        if not call.stream:
            body = await self.post_json(call.obs, urls, path, payload)
            call.obs.finish(200)
            return Response(body, media_type="application/json")
        upstream = await self.open_with_deadline(call.obs, urls, path, payload)
        return sse_response(self.relay(call, upstream), call, upstream)

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

    async def ready(self, base_url: str) -> bool:
        return await self.probe(base_url + "/v1/models")


__all__ = ["OpenAICompatEngine", "GatewayError"]
