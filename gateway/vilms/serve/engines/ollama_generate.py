"""Legacy text completion (/v1/completions) on Ollama's /api/generate, raw (no chat template), both ways translated."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.responses import Response

from vilms.errors import BackendError, BadRequest, scrub
from vilms.serve.engines.base import MAX_LINE_BYTES, ChatCall, Engine, LineBuffer, sse_response
from vilms.serve.engines.ollama_tools import MAX_TOP_LOGPROBS

_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repeat_penalty": "repeat_penalty", "num_ctx": "num_ctx", "min_p": "min_p"}


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
    options = {dst: body[src] for src, dst in _OPTIONS.items() if body.get(src) is not None}
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


def _usage(line: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(line.get("prompt_eval_count") or 0), int(line.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(line: dict[str, Any]) -> str:
    return "length" if line.get("done_reason") == "length" else "stop"


def _head(model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}


def _line(raw: bytes) -> dict[str, Any]:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendError("ollama engine sent a line that is not JSON", code="engine_error") from exc
    if not isinstance(line, dict):
        raise BackendError("ollama engine returned an answer of unknown shape")
    if "error" in line:
        raise BackendError(f"ollama engine error: {scrub(str(line['error'])[:500])}", code="engine_error")
    return line


class GenerateToSse:
    """Ollama's NDJSON generate stream as OpenAI completion chunks, one event per Ollama line."""

    def __init__(self, call: ChatCall, max_line: int = MAX_LINE_BYTES):
        self.call = call
        self.lines = LineBuffer(max_line, "ollama")
        self.offset = 0
        self.head = _head(call.route.name)

    def event(self, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return b"data: " + orjson.dumps({**self.head, "choices": [choice]}) + b"\n\n"

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for raw in self.lines.feed(data):
            if not raw.strip():
                continue
            line = _line(raw)
            text = line.get("response") or ""
            if text:
                out.append(self.event(text, None, legacy_logprobs(line.get("logprobs"), self.offset)))
                self.offset += len(text)
            if line.get("done"):
                out.append(self.event("", _finish(line)))
                if self.call.include_usage:
                    out.append(b"data: " + orjson.dumps({**self.head, "choices": [], "usage": _usage(line)}) + b"\n\n")
                out.append(b"data: [DONE]\n\n")
        return b"".join(out)


async def ollama_complete(engine: Engine, call: ChatCall) -> Response:
    payload = orjson.dumps(generate_request(call.body, call.stream))
    urls = call.route.base_urls
    if call.stream:
        upstream = await engine.open_with_deadline(call.obs, urls, "/api/generate", payload)
        return sse_response(engine.relay(call, upstream, GenerateToSse(call, engine.max_line)), call, upstream)
    line = _line(await engine.post_json(call.obs, urls, "/api/generate", payload))
    answer = {**_head(call.route.name),
              "choices": [{"index": 0, "text": line.get("response") or "", "finish_reason": _finish(line),
                           "logprobs": legacy_logprobs(line.get("logprobs"))}],
              "usage": _usage(line)}
    call.obs.finish(200)
    return Response(orjson.dumps(answer), media_type="application/json")
