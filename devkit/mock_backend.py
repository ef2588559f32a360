"""A deterministic, fast mock engine: OpenAI-compatible (/v1/...) and Ollama-native (/api/...).

Fixed latency before the answer and a fixed number of tokens, optionally spaced in time, so a
gateway's own cost can be measured against it (bench/) and streaming behaviour tested. A bare
ASGI callable (no framework) under uvicorn, so the backend itself is never the bottleneck.
`GET /_stats` reports requests seen and streams the client abandoned (to prove cancellation).

    python -m devkit.mock_backend --port 9000 --latency-ms 20 --tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
NDJSON = [(b"content-type", b"application/x-ndjson")]


class MockBackend:
    def __init__(self, latency_ms: float = 0.0, tokens: int = 16, token_delay_ms: float = 0.0):
        self.latency = latency_ms / 1000
        self.tokens = tokens
        self.token_delay = token_delay_ms / 1000
        self.stats = {"requests": 0, "streams_completed": 0, "streams_abandoned": 0}
        self.last_request: dict[str, Any] = {}
        created = int(time.time())
        self.completion = orjson.dumps({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": created, "model": "mock",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * tokens},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}})
        head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": "mock"}
        self.first_chunk = b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}) + b"\n\n"
        self.token_chunk = b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": "tok "}, "logprobs": None, "finish_reason": None}]}) + b"\n\n"
        self.last_chunk = b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}) + b"\n\n"
        self.usage_chunk = b"data: " + orjson.dumps({**head, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}) + b"\n\n"
        self.ollama_reply = orjson.dumps({"model": "mock", "created_at": "2026-01-01T00:00:00Z",
                                          "message": {"role": "assistant", "content": "tok " * tokens}, "done": True,
                                          "done_reason": "length", "prompt_eval_count": 8, "eval_count": tokens})
        self.ollama_token = orjson.dumps({"model": "mock", "created_at": "2026-01-01T00:00:00Z",
                                          "message": {"role": "assistant", "content": "tok "}, "done": False}) + b"\n"
        self.ollama_done = orjson.dumps({"model": "mock", "created_at": "2026-01-01T00:00:00Z",
                                         "message": {"role": "assistant", "content": ""}, "done": True,
                                         "done_reason": "length", "prompt_eval_count": 8, "eval_count": tokens}) + b"\n"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        chunks = []  # joined once: `body +=` copied a 64 MiB upload ~1000 times
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if path == "/_stats":
            return await self._send(send, 200, JSON, orjson.dumps(self.stats))
        if path in ("/v1/models", "/api/version", "/api/tags"):
            return await self._send(send, 200, JSON, b'{"object":"list","data":[{"id":"mock","object":"model"}],"version":"mock","models":[]}')
        self.stats["requests"] += 1
        request = orjson.loads(body) if body else {}
        self.last_request = request
        stream = request.get("stream", path == "/api/chat")
        if self.latency:
            await asyncio.sleep(self.latency)
        if path == "/v1/chat/completions" and not stream:
            return await self._send(send, 200, JSON, self.completion)
        if path == "/api/chat" and not stream:
            return await self._send(send, 200, JSON, self.ollama_reply)
        if path == "/v1/embeddings":
            n = len(request["input"]) if isinstance(request.get("input"), list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.6, 0.8]} for i in range(n)]
            return await self._send(send, 200, JSON, orjson.dumps({"object": "list", "data": data, "model": "mock",
                                                                    "usage": {"prompt_tokens": n, "total_tokens": n}}))
        if path not in ("/v1/chat/completions", "/api/chat"):
            return await self._send(send, 404, JSON, b'{"error":{"message":"not found"}}')
        openai = path == "/v1/chat/completions"
        usage = openai and bool((request.get("stream_options") or {}).get("include_usage"))
        await send({"type": "http.response.start", "status": 200, "headers": SSE if openai else NDJSON})
        disconnected = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            pieces = [self.first_chunk] if openai else []
            pieces += [self.token_chunk if openai else self.ollama_token] * self.tokens
            pieces += [self.last_chunk] + ([self.usage_chunk] if usage else []) + [b"data: [DONE]\n\n"] if openai else [self.ollama_done]
            for piece in pieces:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if disconnected.done():
                    self.stats["streams_abandoned"] += 1
                    return
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.stats["streams_completed"] += 1
        except OSError:
            self.stats["streams_abandoned"] += 1
        finally:
            disconnected.cancel()

    @staticmethod
    async def _wait_disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _send(send: Any, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(MockBackend(args.latency_ms, args.tokens, args.token_delay_ms), host=args.host, port=args.port,
                log_level="warning", access_log=False, loop="uvloop", http="httptools", backlog=4096)


if __name__ == "__main__":
    main()
