"""What Ollama's two native streams (/api/chat, /api/generate) share: the reply checks, the option names, the
usage count, and one NDJSON → SSE translator whose subclasses say only what a line becomes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import orjson

from vilms.errors import BackendError, scrub
from vilms.serve.engines.base import MAX_LINE_BYTES, ChatCall, LineBuffer

# OpenAI request field -> Ollama options key (chat and generate alike).
OPTIONS = {name: name for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                                   "repeat_penalty", "num_ctx", "min_p")}


def bad_shape(what: str) -> BackendError:
    return BackendError(f"ollama engine sent {what}", code="engine_error")


def _check_message(msg: Any) -> None:
    if not isinstance(msg, dict):
        raise bad_shape("a message that is not an object")
    for key in ("content", "thinking"):
        if msg.get(key) is not None and not isinstance(msg[key], str):
            raise bad_shape(f"a message {key} that is not a string")
    calls = msg.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("function", {}), dict)
            and isinstance(c.get("function", {}).get("name", ""), str) for c in calls)):
        raise bad_shape("tool calls of an unknown shape")


def checked_line(line: Any) -> dict[str, Any]:
    """One reply object (a stream line or a whole answer), every field the translation reads type-checked:
    an engine reply of the wrong shape is an engine error (502), never a crash in the gateway."""
    if not isinstance(line, dict):
        raise bad_shape("a reply that is not a JSON object")
    if "error" in line:
        raise BackendError(f"ollama engine error: {scrub(str(line['error'])[:500])}", code="engine_error")
    if line.get("message") is not None:
        _check_message(line["message"])
    if line.get("response") is not None and not isinstance(line["response"], str):
        raise bad_shape("a response that is not a string")
    for key in ("prompt_eval_count", "eval_count"):
        value = line.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad_shape(f"a {key} that is not an integer")
    if line.get("done_reason") is not None and not isinstance(line["done_reason"], str):
        raise bad_shape("a done_reason that is not a string")
    return line


def parse_line(raw: bytes) -> dict[str, Any]:
    try:
        return checked_line(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise BackendError("ollama engine sent a line that is not JSON", code="engine_error") from exc


def usage(line: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(line.get("prompt_eval_count") or 0), int(line.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class NdjsonToSse(ABC):
    """Ollama's NDJSON stream as OpenAI SSE chunks, one event per Ollama line (never coalesced).

    The loop, the line bound, the error line (events translated before it still go out first), the usage chunk
    and `[DONE]` live here; a subclass turns one line into its events and says how the stream ends."""

    def __init__(self, call: ChatCall, head: dict[str, Any], max_line: int = MAX_LINE_BYTES):
        self.call, self.head = call, head
        self.lines = LineBuffer(max_line, "ollama")

    def sse(self, fields: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self.head, **fields}) + b"\n\n"

    @abstractmethod
    def line_events(self, line: dict[str, Any]) -> list[bytes]:
        """The events one (checked) line becomes before any end of stream."""

    @abstractmethod
    def finish_event(self, line: dict[str, Any]) -> bytes:
        """The event carrying the finish reason, from the line that says done."""

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for raw in self.lines.feed(data):
            if not raw.strip():
                continue
            try:
                line = parse_line(raw)
            except BackendError as exc:
                exc.partial = b"".join(out)  # type: ignore[attr-defined]
                raise
            out.extend(self.line_events(line))
            if line.get("done"):
                out.append(self.finish_event(line))
                if self.call.include_usage:
                    out.append(self.sse({"choices": [], "usage": usage(line)}))
                out.append(b"data: [DONE]\n\n")
        return b"".join(out)
