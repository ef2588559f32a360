"""Legacy text completion (/v1/completions) on Ollama's /api/generate, raw (no chat template), both ways translated."""

from __future__ import annotations

import time
import uuid
from typing import Any

from vilms.errors import BadRequest
from vilms.serve.engines.base import MAX_LINE_BYTES, ChatCall
from vilms.serve.engines.ollama_lines import OPTIONS, NdjsonToSse, usage
from vilms.serve.engines.ollama_tools import MAX_TOP_LOGPROBS


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("the ollama engine takes one prompt string per request (no token arrays, no batches)",
                         param="prompt")
    return prompt


def generate_request(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """An OpenAI completions request as Ollama's /api/generate, raw: the prompt is continued as written."""
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        raise BadRequest("the ollama engine returns one choice per request; n and best_of must be 1", param="n")
    if body.get("echo"):
        raise BadRequest("echo is not supported by the ollama engine", param="echo")
    options = {dst: body[src] for src, dst in OPTIONS.items() if body.get(src) is not None}
    if body.get("max_tokens") is not None:
        options["num_predict"] = body["max_tokens"]
    if body.get("stop") is not None:
        options["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    request: dict[str, Any] = {"model": body["model"], "prompt": _prompt(body), "raw": True, "stream": stream,
                               "options": options}
    if body.get("suffix"):
        request["suffix"] = body["suffix"]
    if body.get("keep_alive") is not None:
        request["keep_alive"] = body["keep_alive"]
    top = body.get("logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
        request["logprobs"] = True
        if top:
            request["top_logprobs"] = top
    return request


def legacy_logprobs(items: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """Ollama's per-token logprobs in the completions API's older, column-wise shape."""
    if not items:
        return None
    tokens = [i.get("token", "") for i in items]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": [i.get("logprob", 0.0) for i in items],
            "top_logprobs": [{t["token"]: t["logprob"] for t in i.get("top_logprobs") or ()} for i in items],
            "text_offset": offsets}


def _finish(line: dict[str, Any]) -> str:
    return "length" if line.get("done_reason") == "length" else "stop"


def _head(model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}


def completion_answer(model: str, line: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) /api/generate answer as a text_completion."""
    return {**_head(model), "choices": [{"index": 0, "text": line.get("response") or "", "finish_reason": _finish(line),
                                         "logprobs": legacy_logprobs(line.get("logprobs"))}], "usage": usage(line)}


class CompletionChunks(NdjsonToSse):
    """/api/generate lines as text_completion events, with the text offsets the legacy logprobs shape counts."""

    def __init__(self, call: ChatCall, max_line: int = MAX_LINE_BYTES):
        super().__init__(call, _head(call.route.name), max_line)
        self.offset = 0

    def event(self, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        return self.sse({"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    def line_events(self, line: dict[str, Any]) -> list[bytes]:
        text = line.get("response") or ""
        if not text:
            return []
        event = self.event(text, None, legacy_logprobs(line.get("logprobs"), self.offset))
        self.offset += len(text)
        return [event]

    def finish_event(self, line: dict[str, Any]) -> bytes:
        return self.event("", _finish(line))
