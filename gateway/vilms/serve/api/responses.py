"""POST /v1/responses, stateless: forwarded to engines that have the route, else served through chat.

Engines that serve the path themselves (`Engine.forwarded`: vLLM, OpenAI-compatible) get the request at their own /v1/responses (model renamed, defaults filled,
images checked as chat checks them); an engine without that route (404/405, e.g. llama.cpp's server) and
Ollama get it translated to a chat request (engines/responses_bridge.py) and the answer translated back.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from starlette.responses import Response

from vilms.config.params import clamp_tokens, enforce_policy, refused_fields, request_stream
from vilms.config.routing import Route
from vilms.errors import BackendError, BadRequest, GatewayError
from vilms.serve.bridges.responses import StreamTranslator, chat_request, check_stateless, response_object
from vilms.serve.engines import ChatCall
from vilms.serve.engines.base import sse_response
from vilms.serve.api.pipeline import Admitted
from vilms.serve.api.requests import ChatRequest, ToolsLimited, checked, counted_list, validated

PATH = "/v1/responses"
_NO_ROUTE = (404, 405)


class ResponsesRequest(ToolsLimited):
    """Typed strictly as chat is ("5" is no token count), so nothing downstream meets a shape it did not expect."""

    model_config = ConfigDict(extra="allow", strict=True)
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

    @field_validator("input", mode="wrap")
    @classmethod
    def _input_limit(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        counted_list(value, info, "max_messages", "input items", "gateway.max-messages")
        return handler(value)


async def handle(body: dict[str, Any], admitted: Admitted) -> Response:
    parsed = await checked(ResponsesRequest, body, admitted.guard.context)
    check_stateless(body)
    route = admitted.resolve(parsed.model, "chat", "/v1/responses")
    enforce_policy(refused_fields(body), body.get("n"), admitted.policy(route))
    if "stream" in body:  # forward what was validated ("false" as a string must not reach the engine)
        body["stream"] = bool(parsed.stream)
    request_stream(body, admitted.state.extras[route.name].stream)  # both paths below read body["stream"]
    await admitted.slot(route)
    if PATH in admitted.engine(route).forwarded:
        forwarded = await _forward(route, body, admitted)
        if forwarded is not None:
            return forwarded
    return await _through_chat(route, body, admitted)


async def _forward(route: Route, body: dict[str, Any], admitted: Admitted) -> Response | None:
    """The engine's own /v1/responses; None when it has no such route (nothing was generated)."""
    extras = admitted.state.extras[route.name]
    forwarded = {**body, "model": route.name}
    for key in ("temperature", "top_p"):
        if forwarded.get(key) is None and extras.defaults.get(key) is not None:
            forwarded[key] = extras.defaults[key]
    if forwarded.get("max_output_tokens") is None and extras.max_tokens is not None:
        forwarded["max_output_tokens"] = extras.max_tokens
    forwarded.setdefault("max_output_tokens", None)  # absent: the operator's ceiling holds on every route
    clamp_tokens(forwarded, admitted.policy(route))
    forwarded["input"] = await _checked_images(route, forwarded["input"], admitted)
    call = ChatCall(route, forwarded, admitted.obs, stream=bool(body.get("stream")))
    try:
        return await admitted.engine(route).forward(call, PATH)
    except GatewayError as exc:
        if exc.status in _NO_ROUTE:  # no such route on this engine: serve it through chat instead
            return None
        raise


_FORWARDED_PARTS = frozenset({"input_text", "output_text", "refusal", "input_image"})


def _parts_of(item: Any) -> tuple[str, list[Any]] | None:
    """Where an input item carries content parts: a message's `content`, or a function_call_output's `output`
    (the Responses API lets a tool answer with images too; the old code looked only at `content`)."""
    if not isinstance(item, dict):
        return None
    for key in ("content", "output"):
        parts = item.get(key)
        if isinstance(parts, list):
            return key, parts
    return None


async def _checked_images(route: Route, items: Any, admitted: Admitted) -> Any:
    """Every input_image goes through the chat image checks (part types, image count, decode, verify, frame cap,
    resize) before the engine sees it; any other content part type is refused here (an engine would fetch its URL)."""
    if not isinstance(items, list):
        return items
    converted: list[tuple[int, str, dict[str, Any]]] = []
    for i, item in enumerate(items):
        found = _parts_of(item)
        if found is None:
            continue
        key, content = found
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in _FORWARDED_PARTS:
                raise BadRequest(f"input[{i}].{key}[{j}]: content part type {kind!r} is not accepted here",
                                 param=f"input[{i}].{key}[{j}]", code="unsupported_content_part")
        if any(p.get("type") == "input_image" for p in content):
            parts = [{"type": "image_url", "image_url": {"url": p.get("image_url")}} if p.get("type") == "input_image"
                     else {"type": "text", "text": p.get("text", "")} for p in content]
            converted.append((i, key, {"role": "user", "content": parts}))
    if not converted:
        return items
    messages = await admitted.images(route, [m for _, _, m in converted])
    out = list(items)
    for (i, key, _), prepared in zip(converted, messages):
        back = [{"type": "input_image", "image_url": p["image_url"]["url"], "detail": "auto"}
                if p["type"] == "image_url" else {"type": "input_text", "text": p["text"]} for p in prepared["content"]]
        out[i] = {**items[i], key: back}
    return out


async def _through_chat(route: Route, body: dict[str, Any], admitted: Admitted) -> Response:
    chat = chat_request(body)
    validated(ChatRequest, chat, admitted.guard.context)  # the chat road's own checks, as if the caller sent this chat
    admitted.fill(route, chat)
    chat["messages"] = await admitted.images(route, chat["messages"])
    stream = bool(body.get("stream"))
    call = ChatCall(route, chat, admitted.obs, stream=stream, include_usage=stream)
    engine = admitted.engine(route)
    answer = await engine.chat(call)
    if stream:
        # Observed like the engine's own stream: a caller gone before the body starts still finishes the request
        # (slot, key count, gauge) and closes the upstream.
        return sse_response(StreamTranslator(body, route.name, engine.max_line).translate(answer.body_iterator),
                            call, getattr(answer, "upstream", None))
    try:
        completion = orjson.loads(answer.body)
    except orjson.JSONDecodeError as exc:
        raise BackendError(f"{route.engine} engine returned a chat answer that is not JSON") from exc
    return Response(orjson.dumps(response_object(body, route.name, completion)), media_type="application/json")
