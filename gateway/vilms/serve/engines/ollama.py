"""Ollama through its native API (/api/chat, /api/embed): the only way to set num_ctx and keep_alive.

Requests are translated from OpenAI shape; NDJSON replies are translated back, chunk by chunk.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.responses import Response

from vilms.errors import BackendError, BadRequest, GatewayError, scrub
from vilms.serve.observe import Observation
from vilms.config.routing import Route
from vilms.serve.engines.base import MAX_LINE_BYTES, ChatCall, EmbedResult, Engine, LineBuffer, sse_response
from vilms.serve.engines.ollama_tools import ToolCallNumbering, check_format_with_tools, logprob_fields, ollama_messages_tool_fields, openai_logprobs, selected_tools, think_value

# OpenAI request field -> Ollama options key.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "num_ctx": "num_ctx",
    "min_p": "min_p",
}
_FINISH = {"stop": "stop", "length": "length"}


def _image_b64(part: dict[str, Any]) -> str:
    """Media preparation turned every image into a data URL; Ollama wants the bare base64."""
    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
    return url.partition(",")[2]


def to_ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message.get("content")
        item: dict[str, Any] = {"role": message["role"]}
        if isinstance(content, list):
            texts, images = [], []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    texts.append(part.get("text", ""))
                elif kind == "image_url":
                    images.append(_image_b64(part))
            item["content"] = "\n".join(texts)
            if images:
                item["images"] = images
        else:
            item["content"] = content or ""
        out.append(item)
    ollama_messages_tool_fields(messages, out)
    return out


def to_ollama_request(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if body.get("n", 1) not in (1, None):
        raise BadRequest("the ollama engine returns one choice per request; n must be 1", param="n")
    options = {dst: body[src] for src, dst in _OPTIONS.items() if body.get(src) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    request: dict[str, Any] = {"model": body["model"], "messages": to_ollama_messages(body["messages"]),
                               "stream": stream, "options": options}
    if body.get("keep_alive") is not None:
        request["keep_alive"] = body["keep_alive"]
    fmt = body.get("response_format") or {}
    tools = selected_tools(body)
    check_format_with_tools(fmt, tools)
    if fmt.get("type") == "json_object":
        request["format"] = "json"
    elif fmt.get("type") == "json_schema":
        request["format"] = (fmt.get("json_schema") or {}).get("schema", {})
    if tools:
        request["tools"] = tools
    effort = body.get("reasoning_effort")
    if effort is not None:
        request["think"] = think_value(effort)
    request.update(logprob_fields(body))
    return request


def _bad_shape(what: str) -> BackendError:
    return BackendError(f"ollama engine sent {what}", code="engine_error")


def checked_line(line: Any) -> dict[str, Any]:
    """One reply object (a stream line or a whole answer), every field the translation reads type-checked:
    an engine reply of the wrong shape is an engine error (502), never a crash in the gateway."""
    if not isinstance(line, dict):
        raise _bad_shape("a reply that is not a JSON object")
    if "error" in line:
        raise BackendError(f"ollama engine error: {scrub(str(line['error'])[:500])}", code="engine_error")
    msg = line.get("message")
    if msg is not None:
        if not isinstance(msg, dict):
            raise _bad_shape("a message that is not an object")
        for key in ("content", "thinking"):
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise _bad_shape(f"a message {key} that is not a string")
        calls = msg.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function", {}), dict)
                and isinstance(c.get("function", {}).get("name", ""), str) for c in calls)):
            raise _bad_shape("tool calls of an unknown shape")
    for key in ("prompt_eval_count", "eval_count"):
        value = line.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise _bad_shape(f"a {key} that is not an integer")
    if line.get("done_reason") is not None and not isinstance(line["done_reason"], str):
        raise _bad_shape("a done_reason that is not a string")
    return line


def _usage(line: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(line.get("prompt_eval_count") or 0), int(line.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(line: dict[str, Any], saw_tools: bool) -> str:
    if saw_tools:
        return "tool_calls"
    return _FINISH.get(line.get("done_reason") or "stop", "stop")


class OllamaEngine(Engine):
    kind = "ollama"

    async def chat(self, call: ChatCall) -> Response:
        payload = orjson.dumps(to_ollama_request(call.body, call.stream))
        urls = call.route.base_urls
        if not call.stream:
            raw = await self.post_json(call.obs, urls, "/api/chat", payload)
            answer = self._completion(call, raw)
            call.obs.finish(200)
            return Response(orjson.dumps(answer), media_type="application/json")
        upstream = await self.open_with_deadline(call.obs, urls, "/api/chat", payload)
        return sse_response(self.relay(call, upstream, NdjsonToSse(call, self.max_line)), call, upstream)

    def _completion(self, call: ChatCall, raw: bytes) -> dict[str, Any]:
        try:
            line = checked_line(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise BackendError("ollama engine returned an answer of unknown shape") from exc
        msg = line.get("message") or {}
        message: dict[str, Any] = {"role": "assistant", "content": msg.get("content", "")}
        if msg.get("thinking"):
            message["reasoning_content"] = msg["thinking"]
        tools = msg.get("tool_calls") or []
        if tools:
            numbering = ToolCallNumbering(call.body.get("parallel_tool_calls") is not False)
            message["tool_calls"] = numbering.convert(tools, with_index=False)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": call.route.name,
                "choices": [{"index": 0, "message": message, "logprobs": openai_logprobs(line.get("logprobs")),
                             "finish_reason": _finish_reason(line, bool(tools))}],
                "usage": _usage(line)}

    async def embed(self, route: Route, inputs: list[str], dimensions: int | None) -> EmbedResult:
        request: dict[str, Any] = {"model": route.name, "input": inputs}
        if dimensions is not None:
            request["dimensions"] = dimensions
        keep_alive = route.spec.params.get("keep-alive")
        if keep_alive is not None:
            request["keep_alive"] = keep_alive
        obs = Observation("embeddings-upstream", "-", route.name, self.kind)
        raw = await self.post_json(obs, route.base_urls, "/api/embed", orjson.dumps(request))
        try:
            data = orjson.loads(raw)
            vectors = data["embeddings"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendError("ollama engine returned an embeddings answer of unknown shape") from exc
        return EmbedResult(vectors, int(data.get("prompt_eval_count") or 0))

    async def ready(self, base_url: str) -> bool:
        return await self.probe(base_url + "/api/version")


class NdjsonToSse:
    """Turns Ollama's NDJSON stream into OpenAI chunks, one SSE event per Ollama line (never coalesced)."""

    def __init__(self, call: ChatCall, max_line: int = MAX_LINE_BYTES):
        self.call = call
        self.lines = LineBuffer(max_line, "ollama")
        self.first = True
        self.saw_tools = False
        self.numbering = ToolCallNumbering(call.body.get("parallel_tool_calls") is not False)
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": call.route.name}

    def event(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return b"data: " + orjson.dumps({**self.head, "choices": [choice]}) + b"\n\n"

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for raw in self.lines.feed(data):
            if not raw.strip():
                continue
            try:
                line = checked_line(orjson.loads(raw))
            except (orjson.JSONDecodeError, BackendError) as exc:
                error = exc if isinstance(exc, BackendError) else BackendError(
                    "ollama engine sent a line that is not JSON", code="engine_error")
                error.partial = b"".join(out)  # events translated before the bad line still go out first
                raise error from exc
            msg = line.get("message") or {}
            delta: dict[str, Any] = {}
            if self.first:
                delta["role"] = "assistant"
                self.first = False
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("thinking"):
                delta["reasoning_content"] = msg["thinking"]
            if msg.get("tool_calls"):
                calls = self.numbering.convert(msg["tool_calls"], with_index=True)
                if calls:
                    self.saw_tools = True
                    delta["tool_calls"] = calls
            if delta:
                out.append(self.event(delta, logprobs=openai_logprobs(line.get("logprobs"))))
            if line.get("done"):
                out.append(self.event({}, _finish_reason(line, self.saw_tools)))
                if self.call.include_usage:
                    out.append(b"data: " + orjson.dumps({**self.head, "choices": [], "usage": _usage(line)}) + b"\n\n")
                out.append(b"data: [DONE]\n\n")
        return b"".join(out)


__all__ = ["OllamaEngine", "GatewayError"]
