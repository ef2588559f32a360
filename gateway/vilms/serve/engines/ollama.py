"""Ollama through its native API (/api/chat, /api/embed): the only way to set num_ctx and keep_alive.

Requests are translated from OpenAI shape; NDJSON replies are translated back, chunk by chunk.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.responses import Response

from vilms.errors import BackendError, BadRequest, GatewayError
from vilms.serve.observe import Observation
from vilms.config.routing import Route
from vilms.serve.engines.base import MAX_LINE_BYTES, ChatCall, EmbedResult, Engine, sse_response
from vilms.serve.engines.ollama_generate import CompletionChunks, completion_answer, generate_request
from vilms.serve.engines.ollama_lines import OPTIONS, NdjsonToSse, checked_line, parse_line, usage
from vilms.serve.engines.ollama_tools import ToolCallNumbering, check_format_with_tools, logprob_fields, ollama_messages_tool_fields, openai_logprobs, selected_tools, think_value

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
    options = {dst: body[src] for src, dst in OPTIONS.items() if body.get(src) is not None}
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
        return sse_response(self.relay(call, upstream, ChatChunks(call, self.max_line)), call, upstream)

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
                "usage": usage(line)}

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

    async def complete(self, call: ChatCall) -> Response:
        """/v1/completions on /api/generate, raw: the prompt is continued as written (no chat template)."""
        payload = orjson.dumps(generate_request(call.body, call.stream))
        urls = call.route.base_urls
        if call.stream:
            upstream = await self.open_with_deadline(call.obs, urls, "/api/generate", payload)
            return sse_response(self.relay(call, upstream, CompletionChunks(call, self.max_line)), call, upstream)
        answer = completion_answer(call.route.name, parse_line(await self.post_json(call.obs, urls, "/api/generate",
                                                                                    payload)))
        call.obs.finish(200)
        return Response(orjson.dumps(answer), media_type="application/json")

    list_path = "/api/tags"
    lists_names = True

    def listed(self, data: Any) -> frozenset[str]:
        return frozenset(self.listed_name(row["name"]) for row in data["models"])

    def listed_name(self, name: str) -> str:
        """Ollama lists `llama3` as `llama3:latest`."""
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class ChatChunks(NdjsonToSse):
    """/api/chat lines as chat.completion.chunk events: role first, content, reasoning, numbered tool calls."""

    def __init__(self, call: ChatCall, max_line: int = MAX_LINE_BYTES):
        super().__init__(call, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                                "created": int(time.time()), "model": call.route.name}, max_line)
        self.first, self.saw_tools = True, False
        self.numbering = ToolCallNumbering(call.body.get("parallel_tool_calls") is not False)

    def event(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return self.sse({"choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    def line_events(self, line: dict[str, Any]) -> list[bytes]:
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
        return [self.event(delta, logprobs=openai_logprobs(line.get("logprobs")))] if delta else []

    def finish_event(self, line: dict[str, Any]) -> bytes:
        return self.event({}, _finish_reason(line, self.saw_tools))


__all__ = ["OllamaEngine", "GatewayError"]
