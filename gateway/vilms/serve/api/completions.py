"""POST /v1/completions (legacy text completion): pass-through to vLLM/OpenAI-compatible engines,
Ollama's /api/generate (raw prompt) for Ollama. Same routing, aliases, defaults and envelopes as chat."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from vilms.serve.engines import ChatCall
from vilms.serve.engines.ollama_generate import ollama_complete
from vilms.serve.observe import Observation
from vilms.config.params import apply_defaults, clamp_tokens, enforce_policy, refused_fields, request_stream
from vilms.serve.api.guard import Admitted
from vilms.serve.api.requests import validated
from vilms.serve.api.served import chat_route
from vilms.serve.api.state import GatewayState


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None


async def handle(body: dict[str, Any], state: GatewayState, obs: Observation, admitted: Admitted) -> Response:
    parsed = validated(CompletionRequest, body)
    route = chat_route(state, parsed.model, obs, "/v1/completions", admitted)
    policy = admitted.policy(route)
    enforce_policy(refused_fields(body), parsed.n, policy)
    extras = state.extras[route.name]
    body["model"] = route.name
    if "stream" in body:  # forward what was validated ("false" as a string must not reach the engine)
        body["stream"] = bool(parsed.stream)
    apply_defaults(body, extras.defaults, extras.max_tokens)
    clamp_tokens(body, policy)
    await admitted.slot(route, obs)
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    call = ChatCall(route, body, obs, stream=request_stream(body, extras.stream), include_usage=include_usage)
    engine = state.engines[route.engine]
    if route.engine == "ollama":
        return await ollama_complete(engine, call)
    return await engine.forward(call, "/v1/completions")
