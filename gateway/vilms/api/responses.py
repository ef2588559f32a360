"""POST /v1/responses, stateless: forwarded to engines that have the route, else served through chat.

vLLM / OpenAI-compatible engines get the request at their own /v1/responses (model renamed, defaults filled,
images checked as chat checks them); an engine without that route (404/405, e.g. llama.cpp's server) and
Ollama get it translated to a chat request (engines/responses_bridge.py) and the answer translated back.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from ..engines import ChatCall
from ..engines.base import sse_response
from ..engines.responses_bridge import StreamTranslator, chat_request, check_stateless, response_object
from ..errors import BackendError, GatewayError
from ..media import has_images, prepare_images
from ..observe import Observation
from ..params import apply_defaults
from ..routing import Route
from .requests import parse_json, read_body, validated
from .served import chat_route
from .state import GatewayState

_PASS_THROUGH = ("vllm", "openai")
_NO_ROUTE = (404, 405)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    stream: bool | None = False
    store: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None


async def handle(request: Request, state: GatewayState, obs: Observation, body_limit: int) -> Response:
    body = parse_json(await read_body(request, body_limit))
    validated(ResponsesRequest, body)
    check_stateless(body)
    route = chat_route(state, body["model"], obs, "/v1/responses")
    if route.engine in _PASS_THROUGH:
        forwarded = await _forward(state, route, body, obs)
        if forwarded is not None:
            return forwarded
    return await _through_chat(state, route, body, obs)


async def _forward(state: GatewayState, route: Route, body: dict[str, Any], obs: Observation) -> Response | None:
    """The engine's own /v1/responses; None when it has no such route (nothing was generated)."""
    extras = state.extras[route.name]
    forwarded = {**body, "model": route.name}
    for key in ("temperature", "top_p"):
        if forwarded.get(key) is None and extras.defaults.get(key) is not None:
            forwarded[key] = extras.defaults[key]
    if forwarded.get("max_output_tokens") is None and extras.max_tokens is not None:
        forwarded["max_output_tokens"] = extras.max_tokens
    forwarded["input"] = await _checked_images(state, route, forwarded["input"])
    call = ChatCall(route, forwarded, obs, stream=bool(body.get("stream")))
    try:
        return await state.engines[route.engine].forward(call, "/v1/responses")
    except GatewayError as exc:
        if exc.status in _NO_ROUTE:  # no such route on this engine: serve it through chat instead
            return None
        raise


async def _checked_images(state: GatewayState, route: Route, items: Any) -> Any:
    """Every input_image goes through the chat image checks (decode, verify, frame cap, resize)."""
    if not isinstance(items, list):
        return items
    out = []
    for item in items:
        content = item.get("content") if isinstance(item, dict) else None
        if not (isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "input_image"
                                                  for p in content)):
            out.append(item)
            continue
        parts = [{"type": "image_url", "image_url": {"url": p.get("image_url")}} if p.get("type") == "input_image"
                 else {"type": "text", "text": p.get("text", "")} for p in content]
        [prepared] = await prepare_images([{"role": "user", "content": parts}], state.extras[route.name].image_limits,
                                          state.fetcher)
        back = [{"type": "input_image", "image_url": p["image_url"]["url"], "detail": "auto"}
                if p["type"] == "image_url" else {"type": "input_text", "text": p["text"]} for p in prepared["content"]]
        out.append({**item, "content": back})
    return out


async def _through_chat(state: GatewayState, route: Route, body: dict[str, Any], obs: Observation) -> Response:
    extras = state.extras[route.name]
    chat = chat_request(body)
    chat["model"] = route.name
    apply_defaults(chat, extras.defaults, extras.max_tokens)
    if has_images(chat["messages"]):
        chat["messages"] = await prepare_images(chat["messages"], extras.image_limits, state.fetcher)
    stream = bool(body.get("stream"))
    call = ChatCall(route, chat, obs, stream=stream, include_usage=stream)
    answer = await state.engines[route.engine].chat(call)
    if stream:
        return sse_response(StreamTranslator(body, route.name).translate(answer.body_iterator))
    try:
        completion = orjson.loads(answer.body)
    except orjson.JSONDecodeError as exc:
        raise BackendError(f"{route.engine} engine returned a chat answer that is not JSON") from exc
    return Response(orjson.dumps(response_object(body, route.name, completion)), media_type="application/json")
