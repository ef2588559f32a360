"""The Responses API on top of chat completions, for engines that have no /v1/responses of their own.

Three translations, each pure: a Responses request → a chat request (`chat_request`), a chat completion → a
Response object (`response_object`), and a chat SSE stream → Responses stream events (`StreamTranslator`).
The chat request then takes the same road as /v1/chat/completions (defaults, image checks, engine mapping),
so Ollama gets the same mapping chat uses. Stateless: nothing is stored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import orjson

from vilms.errors import BackendError, BadRequest, GatewayError, scrub
from vilms.serve.engines.base import MAX_LINE_BYTES, LineBuffer

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ---------------------------------------------------------------------------------------------------


def check_stateless(body: dict[str, Any]) -> None:
    """This gateway keeps no responses: refuse clearly what would need them."""
    if body.get("store") is True:
        raise BadRequest("this gateway does not store responses; send store: false (or leave it out)", param="store",
                         code="unsupported_parameter")
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise BadRequest(f"{field} needs stored responses, which this gateway does not keep; send the earlier "
                             "turns in input instead", param=field, code="unsupported_parameter")
    if body.get("background"):
        raise BadRequest("background responses are not supported (nothing is stored)", param="background",
                         code="unsupported_parameter")


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadRequest(f"{where} must be an object", param=where)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise BadRequest(f"{where}.type must be a string", param=f"{where}.type")
    if kind in _TEXT_PARTS or kind == "refusal":
        text = part.get("text", part.get("refusal", ""))
        if not isinstance(text, str):
            raise BadRequest(f"{where}.text must be a string", param=f"{where}.text")
        return {"type": "text", "text": text}
    if kind == "input_image":
        if not part.get("image_url"):
            raise BadRequest(f"{where}: only image_url images are supported (no file_id)", param=where)
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    raise BadRequest(f"{where}: content type {kind!r} is not supported", param=where)


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(_ROLES)}", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
        if all(p["type"] == "text" for p in parts):  # plain text keeps every engine's chat template happy
            return {"role": role, "content": "".join(p["text"] for p in parts)}
        return {"role": role, "content": parts}
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    return {"role": role, "content": content}


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` + `input` (a string or a list of items) as chat messages."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input must be a string or a non-empty list of items", param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or new_id("call"), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                parts = [_part(p, f"{where}.output[{j}]") for j, p in enumerate(output)]
                output = "".join(p["text"] for p in parts if p["type"] == "text")
            elif output is not None and not isinstance(output, str):
                raise BadRequest(f"{where}.output must be a string or a list of parts", param=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output or ""})
        elif kind == "reasoning":
            continue  # the engine's own earlier thinking: not sent back
        else:
            raise BadRequest(f"{where}: item type {kind!r} is not supported", param=where)
    return messages


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise BadRequest(f"tools[{i}]: only function tools are supported (got {kind!r})", param=f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    if not isinstance(fmt, dict):
        raise BadRequest("text.format must be an object", param="text.format")
    kind = fmt.get("type")
    if kind is not None and not isinstance(kind, str):
        raise BadRequest("text.format.type must be a string", param="text.format.type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest(f"text.format type {kind!r} is not supported", param="text.format")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat request the gateway's chat road takes."""
    chat: dict[str, Any] = {"model": body["model"], "messages": chat_messages(body)}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("parallel_tool_calls", "parallel_tool_calls"), ("top_logprobs", "top_logprobs")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("top_logprobs"):
        chat["logprobs"] = True
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# -- response --------------------------------------------------------------------------------------------------


def usage_object(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def skeleton(body: dict[str, Any], model: str, response_id: str, created: int) -> dict[str, Any]:
    """The Response object's fixed fields, echoing the request as OpenAI does."""
    text = body.get("text") or {"format": {"type": "text"}}
    return {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "model": model, "output": [], "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": text, "reasoning": body.get("reasoning"), "store": False, "background": False,
            "previous_response_id": None, "metadata": body.get("metadata") or {}, "truncation": "disabled",
            "usage": None}


def finish(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    reason = _INCOMPLETE.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["completed_at"] = int(time.time())
    response["usage"] = usage_object(usage)
    return response


def message_item(item_id: str, text: str, logprobs: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": text}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    return list((choice.get("logprobs") or {}).get("content") or ())


def response_object(body: dict[str, Any], model: str, completion: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as a finished Response."""
    try:
        choice = completion["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise GatewayError("the engine's chat answer has no choices", status=502, type="upstream_error") from exc
    response = skeleton(body, model, new_id("resp"), int(time.time()))
    if message.get("reasoning_content"):
        response["output"].append(reasoning_item(new_id("rs"), message["reasoning_content"]))
    if message.get("content") or not message.get("tool_calls"):
        response["output"].append(message_item(new_id("msg"), message.get("content") or "", _logprobs(choice)))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        response["output"].append(call_item(new_id("fc"), call.get("id") or new_id("call"), fn.get("name", ""),
                                            fn.get("arguments") or ""))
    return finish(response, choice.get("finish_reason"), completion.get("usage"))


def sse_event(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class StreamTranslator:
    """Chat completion chunks (SSE) in, Responses stream events out, in the order the openai client expects.

    Items open as their first delta arrives (reasoning, message text, each tool call by its index) and all close
    at the end, before `response.completed` (also sent when the answer was cut by length: status `incomplete`).
    """

    def __init__(self, body: dict[str, Any], model: str, max_line: int = MAX_LINE_BYTES):
        self.response = skeleton(body, model, new_id("resp"), int(time.time()))
        self.seq = 0
        self.items: list[dict[str, Any]] = []      # open output items, by output_index
        self.text: dict[str, int] = {}             # "reasoning"/"message" -> output_index
        self.calls: dict[int, int] = {}            # chat tool-call index -> output_index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.events = LineBuffer(max_line, "chat", sep=b"\n\n")

    def emit(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(event)

    def start(self) -> bytes:
        return (self.emit("response.created", response=self.response)
                + self.emit("response.in_progress", response=self.response))

    def _open(self, item: dict[str, Any]) -> bytes:
        self.items.append(item)
        index = len(self.items) - 1
        textual = item["type"] in ("message", "reasoning")
        if textual:
            item["content"] = []
        out = self.emit("response.output_item.added", output_index=index, item=item)
        if textual:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} \
                if item["type"] == "message" else {"type": "reasoning_text", "text": ""}
            out += self.emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
            item["content"] = [dict(part, logprobs=[]) if item["type"] == "message" else dict(part)]
        return out

    def _text(self, key: str, delta: str, logprobs: list[dict[str, Any]]) -> bytes:
        out = b""
        if key not in self.text:
            item = message_item(new_id("msg"), "", [], "in_progress") if key == "message" else \
                {**reasoning_item(new_id("rs"), ""), "status": "in_progress"}
            out += self._open(item)
            self.text[key] = len(self.items) - 1
        index = self.text[key]
        item = self.items[index]
        part = item["content"][0]
        part["text"] += delta
        if key == "message":
            part["logprobs"] += logprobs
            return out + self.emit("response.output_text.delta", item_id=item["id"], output_index=index,
                                   content_index=0, delta=delta, logprobs=logprobs)
        return out + self.emit("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                               content_index=0, delta=delta)

    def _call(self, call: dict[str, Any]) -> bytes:
        out = b""
        key = call.get("index", 0)
        fn = call.get("function") or {}
        if key not in self.calls:
            item = call_item(new_id("fc"), call.get("id") or new_id("call"), fn.get("name") or "", "", "in_progress")
            out += self._open(item)
            self.calls[key] = len(self.items) - 1
        index = self.calls[key]
        item = self.items[index]
        if fn.get("name") and not item["name"]:
            item["name"] = fn["name"]
        delta = fn.get("arguments") or ""
        if delta:
            item["arguments"] += delta
            out += self.emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                             delta=delta)
        return out

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = b""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self._text("reasoning", delta["reasoning_content"], [])
            if delta.get("content"):
                out += self._text("message", delta["content"], _logprobs(choice))
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def _close(self, index: int, item: dict[str, Any]) -> bytes:
        item["status"] = "completed"
        out = b""
        if item["type"] == "message":
            part = item["content"][0]
            out += self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"], logprobs=part["logprobs"])
            out += self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            out += self.emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"])
            out += self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
        else:
            out += self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             name=item["name"], arguments=item["arguments"])
        return out + self.emit("response.output_item.done", output_index=index, item=item)

    def end(self) -> bytes:
        out = b"" if self.items else self._open(message_item(new_id("msg"), "", [], "in_progress"))
        for index, item in enumerate(self.items):
            out += self._close(index, item)
        self.response["output"] = self.items
        finish(self.response, self.finish_reason, self.usage)
        return out + self.emit("response.completed", response=self.response)

    def error(self, envelope: dict[str, Any]) -> bytes:
        """An engine's (or the relay's) error as the Responses stream's error event, its text scrubbed of hosts."""
        err = envelope.get("error") if isinstance(envelope.get("error"), dict) else {}
        message = err.get("message")
        return self.emit("error", code=err.get("code") or err.get("type"),
                         message=scrub(message) if isinstance(message, str) else "engine error", param=err.get("param"))

    async def translate(self, chat_stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Consume the chat SSE relay; its `finally` (upstream close, metrics) runs when this one is closed."""
        yield self.start()
        try:
            async for data in chat_stream:
                for event in self.events.feed(data):
                    payload = event.partition(b"data: ")[2].strip()
                    if not payload or payload == b"[DONE]":
                        continue
                    chunk = orjson.loads(payload)
                    if not isinstance(chunk, dict):
                        raise BackendError("engine sent a stream event that is not a JSON object", code="engine_error")
                    if "error" in chunk:
                        yield self.error(chunk)
                        return
                    out = self.chunk(chunk)
                    if out:
                        yield out
            yield self.end()
        except GatewayError as exc:  # a line too long or a bad event: one error event, then the stream ends
            yield self.error(exc.envelope())
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError, ValueError):
            yield self.error(BackendError("engine sent a stream event of unknown shape", code="engine_error").envelope())
        finally:
            aclose = getattr(chat_stream, "aclose", None)
            if aclose is not None:
                await aclose()
