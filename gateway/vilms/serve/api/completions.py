"""POST /v1/completions (legacy text completion): pass-through to vLLM/OpenAI-compatible engines,
Ollama's /api/generate (raw prompt) for Ollama (each engine's `complete`). Same routing, aliases, defaults and envelopes as chat."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from vilms.config.params import enforce_policy, refused_fields
from vilms.serve.api.pipeline import Admitted
from vilms.serve.api.requests import validated


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


async def handle(body: dict[str, Any], admitted: Admitted) -> Response:
    parsed = validated(CompletionRequest, body)
    route = admitted.resolve(parsed.model, "chat", "/v1/completions")
    enforce_policy(refused_fields(body), parsed.n, admitted.policy(route))
    if "stream" in body:  # forward what was validated ("false" as a string must not reach the engine)
        body["stream"] = bool(parsed.stream)
    admitted.fill(route, body)
    await admitted.slot(route)
    return await admitted.engine(route).complete(admitted.generation(route, body, parsed.stream_options))
