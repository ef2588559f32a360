"""OpenAI features Ollama's native API spells differently: tool choice, tool calls and results, thinking, logprobs.

Ollama ignores `tool_choice` and drops tools when a `format` is also set, so the gateway decides here what is
sent, and refuses (400) what cannot be honoured rather than letting it vanish.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable

import orjson

from vilms.errors import BadRequest

_THINK = {"none": False, "minimal": False, "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}
MAX_TOP_LOGPROBS = 20


def selected_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools to send, after `tool_choice`: none → no tools, a named function → only that one.

    `auto` and `required` send every tool (Ollama cannot force a call: `required` is best effort).
    """
    tools = body.get("tools") or None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRequest("tools must be a list of tool objects", param="tools")
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        if choice == "required" and not tools:
            raise BadRequest("tool_choice 'required' needs tools", param="tool_choice")
        return tools
    if choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        picked = [t for t in tools or () if (t.get("function") or {}).get("name") == name]
        if not picked:
            raise BadRequest(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return picked
    raise BadRequest("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                     "{\"name\": ...}}", param="tool_choice")


def check_format_with_tools(fmt: dict[str, Any], tools: list[dict[str, Any]] | None) -> None:
    """Ollama silently drops tools when a format is set: refuse the pair instead."""
    if tools and fmt.get("type") in ("json_object", "json_schema"):
        raise BadRequest("the ollama engine cannot combine tools with response_format "
                         f"{fmt['type']!r} (it would drop the tools); send one of them, or tool_choice 'none'",
                         param="response_format", code="unsupported_combination")


def think_value(effort: Any) -> bool | str:
    """`reasoning_effort` → Ollama's `think`: none/minimal switch thinking off, levels pass as levels."""
    if isinstance(effort, bool):
        return effort
    if isinstance(effort, str) and effort in _THINK:
        return _THINK[effort]
    raise BadRequest(f"reasoning_effort must be one of {', '.join(_THINK)}", param="reasoning_effort")


def logprob_fields(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's logprobs/top_logprobs → Ollama's native fields of the same names (checked the same way)."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if not want:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if not want:
        return {}
    return {"logprobs": True, **({"top_logprobs": top} if top else {})}


def _entry(item: dict[str, Any]) -> dict[str, Any]:
    token = item.get("token", "")
    raw = item.get("bytes")
    return {"token": token, "logprob": item.get("logprob", 0.0),
            "bytes": list(raw) if raw is not None else list(token.encode())}


def openai_logprobs(items: Iterable[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Ollama's per-token logprobs → an OpenAI choice's `logprobs` object."""
    if not items:
        return None
    content = [{**_entry(i), "top_logprobs": [_entry(t) for t in i.get("top_logprobs") or ()]} for i in items]
    return {"content": content, "refusal": None}


def ollama_messages_tool_fields(messages: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    """Keep each assistant call's id, and name each tool result after the call it answers (by tool_call_id)."""
    names: dict[str, str] = {}
    for message, item in zip(messages, out):
        calls = message.get("tool_calls") or ()
        if calls:
            item["tool_calls"] = []
            for i, call in enumerate(calls):
                fn = call.get("function") or {}
                if call.get("id"):
                    names[call["id"]] = fn.get("name", "")
                entry = {"function": {"index": i, "name": fn.get("name", ""), "arguments": json_args(fn.get("arguments"))}}
                if call.get("id"):
                    entry["id"] = call["id"]
                item["tool_calls"].append(entry)
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("name") or names.get(call_id or "")
            if name:
                item["tool_name"] = name
            if call_id:
                item["tool_call_id"] = call_id


def json_args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments) if arguments else {}
        except orjson.JSONDecodeError:
            return arguments
    return arguments or {}


class ToolCallNumbering:
    """OpenAI tool calls from Ollama's, numbered once per answer (Ollama may send one call per stream line)."""

    def __init__(self, parallel: bool = True):
        self.count = 0
        self.parallel = parallel

    def convert(self, calls: list[dict[str, Any]], with_index: bool) -> list[dict[str, Any]]:
        out = []
        for call in calls:
            if not self.parallel and self.count >= 1:
                break  # parallel_tool_calls: false keeps the first call only
            fn = call.get("function", {})
            args = fn.get("arguments", {})
            entry: dict[str, Any] = {
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": fn.get("name", ""),
                             "arguments": args if isinstance(args, str) else orjson.dumps(args).decode()}}
            if with_index:
                entry["index"] = self.count
            self.count += 1
            out.append(entry)
        return out
