"""A stand-in for Ollama's native API (/api/chat, /api/generate, /api/embed, /api/pull, /api/create, /api/tags,
/api/version).

Ollama's own images cannot be pulled here. This server speaks the same wire protocol so the
gateway's Ollama adapter, the `ollama` client library and the Ansible model-pull step are
exercised for real. It generates either with the real llama.cpp engine (`--gguf`, used by the
molecule rig and the demo) or with canned, deterministic words (tests, benchmarks), optionally
holding each token `--token-delay-ms`.

Test hooks, by model name: a model named `fail-midstream` streams two tokens then an error line.
With `format`, the (non-streamed) answer is a JSON object filling the schema's properties.
With `tools`, the answer calls every tool offered (arguments `{"city": "Hanoi"}`); streamed, one call per NDJSON
line, as Ollama does for parallel calls. `logprobs`/`top_logprobs` add Ollama's per-token `logprobs`.
Every request body is logged in `state["requests"]` and its headers in `state["headers"]` (tests read both).
Run as a server it keeps what was pulled or created in `$OLLAMA_MODELS` (default ~/.ollama/models, the volume the
compose file mounts), as Ollama does, so a recreated container (a rollback) still lists its models.

    python -m devkit.ollama_standin --port 11434 [--gguf tiny.gguf] [--models a,b]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ndjson(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


class Generator:
    """Produces tokens for a chat: canned words, or the real llama.cpp engine."""

    def __init__(self, gguf: str | None):
        self.llama = None
        self.lock = threading.Lock()
        if gguf:
            from llama_cpp import Llama

            self.llama = Llama(model_path=gguf, n_ctx=1024, n_threads=2, verbose=False, embedding=False)

    def canned(self, messages: list[dict[str, Any]], limit: int) -> list[str]:
        seed = hashlib.sha256(orjson.dumps(messages)).digest()
        return [WORDS[seed[i % len(seed)] % len(WORDS)] + " " for i in range(limit)]

    def real(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> Any:
        with self.lock:
            return list(self.llama.create_chat_completion(
                messages=[{"role": m["role"], "content": m.get("content", "")} for m in messages],
                max_tokens=options.get("num_predict", 16), temperature=options.get("temperature", 0.8),
                stop=options.get("stop"), seed=options.get("seed"), stream=True))


class ModelStore:
    """The pulled/created model names, kept in a file of the models directory when one is given; plus, as Ollama
    does, every model whose manifest is in the directory's store layout (`manifests/<registry>/<ns>/<model>/<tag>`),
    read on each listing, so models shipped into the volume while the server runs are listed."""

    def __init__(self, models: list[str], directory: Path | None = None):
        self.directory = directory
        self.path = directory / "vilms-standin-models.json" if directory else None
        self.own = set(models)
        if self.path is not None and self.path.exists():
            self.own |= set(json.loads(self.path.read_text()))

    @property
    def names(self) -> set[str]:
        return self.own | self.manifests()

    def manifests(self) -> set[str]:
        root = self.directory / "manifests" if self.directory else None
        if root is None or not root.is_dir():
            return set()
        found = set()
        for tag in root.glob("*/*/*/*"):
            registry, namespace, model = tag.parts[-4:-1]
            prefix = "" if registry == "registry.ollama.ai" and namespace == "library" else (
                f"{namespace}/" if registry == "registry.ollama.ai" else f"{registry}/{namespace}/")
            found.add(f"{prefix}{model}:{tag.name}")
        return found

    def add(self, name: str) -> None:
        self.own.add(name)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sorted(self.own)))
            tmp.replace(self.path)


def create_app(models: list[str], gguf: str | None = None, token_delay_ms: float = 0.0,
               embed_dim: int = 8, store: Path | None = None) -> Starlette:
    state: dict[str, Any] = {"store": ModelStore(models, store), "requests": [], "headers": [],
                             "generator": Generator(gguf)}

    def known(name: str) -> bool:
        names = state["store"].names
        return name in names or name.split(":")[0] in {m.split(":")[0] for m in names} or name == "fail-midstream"

    def not_found(name: str) -> Response:
        return Response(orjson.dumps({"error": f"model '{name}' not found"}), status_code=404,
                        media_type="application/json")

    async def version(request: Request) -> Response:
        return Response(orjson.dumps({"version": "0.6.8-standin"}), media_type="application/json")

    async def create(request: Request) -> Response:
        """/api/create: a derived model (FROM an existing one, optional LoRA adapters) becomes listed."""
        body = orjson.loads(await request.body())
        state["requests"].append(("create", body))
        if not known(body.get("from", "")):
            return not_found(body.get("from", ""))
        name = body["model"]
        state["store"].add(name if ":" in name else name + ":latest")  # as Ollama names it
        return Response(orjson.dumps({"status": "success"}), media_type="application/json")

    async def tags(request: Request) -> Response:
        return Response(orjson.dumps({"models": [
            {"name": m, "model": m, "modified_at": _now(), "size": 1, "digest": hashlib.sha256(m.encode()).hexdigest(),
             "details": {"format": "gguf", "family": "llama", "parameter_size": "1M", "quantization_level": "F32"}}
            for m in sorted(state["store"].names)]}), media_type="application/json")

    async def pull(request: Request) -> Response:
        body = orjson.loads(await request.body())
        name = body.get("model") or body.get("name")
        state["requests"].append(("pull", body))
        state["store"].add(name)
        steps = [{"status": "pulling manifest"},
                 {"status": "pulling 0000", "digest": "sha256:0000", "total": 100, "completed": 100},
                 {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        if body.get("stream") is False:
            return Response(orjson.dumps(steps[-1]), media_type="application/json")
        return StreamingResponse(iter([_ndjson(s) for s in steps]), media_type="application/x-ndjson")

    async def tokens(body: dict[str, Any]) -> AsyncIterator[tuple[str, str | None]]:
        options = body.get("options") or {}
        limit = int(options.get("num_predict") or 8)
        if state["generator"].llama is not None:
            chunks = await asyncio.to_thread(state["generator"].real, body["messages"], options)
            for c in chunks:
                choice = c["choices"][0]
                text = choice["delta"].get("content") or ""
                if text:
                    yield text, None
                if choice.get("finish_reason"):
                    yield "", choice["finish_reason"]
            return
        words = state["generator"].canned(body["messages"], limit)
        stops = options.get("stop") or []
        for word in words:
            if token_delay_ms:
                await asyncio.sleep(token_delay_ms / 1000)
            if word.strip() in stops:
                yield "", "stop"
                return
            yield word, None
        yield "", "length"

    def final(body: dict[str, Any], reason: str, count: int, started: float) -> dict[str, Any]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 4
        elapsed = int((time.perf_counter() - started) * 1e9)
        return {"model": body["model"], "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": reason, "total_duration": elapsed, "load_duration": 0,
                "prompt_eval_count": prompt, "prompt_eval_duration": 1, "eval_count": count, "eval_duration": elapsed}

    def logprobs(body: dict[str, Any], piece: str) -> dict[str, Any]:
        if not body.get("logprobs") or not piece:
            return {}
        top = int(body.get("top_logprobs") or 0)
        alternatives = [{"token": piece, "logprob": -0.25}] + [{"token": w + " ", "logprob": -2.0 - i}
                                                               for i, w in enumerate(WORDS[: max(top - 1, 0)])]
        return {"logprobs": [{"token": piece, "logprob": -0.25, "top_logprobs": alternatives[:top]}]}

    def formatted(fmt: Any, words: list[str]) -> str:
        """With `format` (json or a schema), a JSON object: each schema property filled by its type."""
        props = (fmt.get("properties") or {}) if isinstance(fmt, dict) else {}
        fill = {"string": " ".join(w.strip() for w in words) or "alpha", "integer": 1, "number": 1.5, "boolean": True,
                "array": [], "object": {}}
        return orjson.dumps({k: fill.get(v.get("type"), None) for k, v in props.items()}).decode()

    def tool_calls(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"function": {"name": t["function"]["name"], "arguments": {"city": "Hanoi"}}} for t in tools]

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        state["requests"].append(("chat", body))
        state["headers"].append(("chat", dict(request.headers)))
        if not known(body.get("model", "")):
            return not_found(body.get("model", ""))
        started = time.perf_counter()
        stream = body.get("stream", True)
        if body["model"] == "fail-midstream":
            async def broken() -> AsyncIterator[bytes]:
                for word in ("one ", "two "):
                    yield _ndjson({"model": body["model"], "created_at": _now(),
                                   "message": {"role": "assistant", "content": word}, "done": False})
                yield _ndjson({"error": "an error was encountered while running the model: out of memory"})
            return StreamingResponse(broken(), media_type="application/x-ndjson")
        tools = body.get("tools")
        if not stream:
            text, reason, count, probs = "", "length", 0, []
            async for piece, finish in tokens(body):
                text += piece
                count += bool(piece)
                reason = finish or reason
                probs += logprobs(body, piece).get("logprobs", [])
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if body.get("format"):
                message["content"], reason = formatted(body["format"], text.split()), "stop"
            if tools:
                message = {"role": "assistant", "content": "", "tool_calls": tool_calls(tools)}
                reason, probs = "stop", []
            reply = final(body, reason, count, started)
            reply["message"] = message
            if probs:
                reply["logprobs"] = probs
            return Response(orjson.dumps(reply), media_type="application/json")

        async def lines() -> AsyncIterator[bytes]:
            count, reason = 0, "length"
            if tools:  # one call per line, as Ollama streams parallel calls
                for call in tool_calls(tools):
                    yield _ndjson({"model": body["model"], "created_at": _now(),
                                   "message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False})
                yield _ndjson(final(body, "stop", len(tools), started))
                return
            async for piece, finish in tokens(body):
                if piece:
                    count += 1
                    yield _ndjson({"model": body["model"], "created_at": _now(),
                                   "message": {"role": "assistant", "content": piece}, "done": False,
                                   **logprobs(body, piece)})
                reason = finish or reason
            yield _ndjson(final(body, reason, count, started))

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def generate(request: Request) -> Response:
        """/api/generate: the prompt (raw) continued with the same tokens chat would give, one line per token."""
        body = orjson.loads(await request.body())
        state["requests"].append(("generate", body))
        state["headers"].append(("generate", dict(request.headers)))
        if not known(body.get("model", "")):
            return not_found(body.get("model", ""))
        started = time.perf_counter()
        as_chat = {**body, "messages": [{"role": "user", "content": body.get("prompt", "")}]}
        pieces, reason = [], "length"
        async for piece, finish in tokens(as_chat):
            if piece:
                pieces.append(piece)
            reason = finish or reason
        done = {k: v for k, v in final(as_chat, reason, len(pieces), started).items() if k != "message"}
        if not body.get("stream", True):
            probs = [p for piece in pieces for p in logprobs(body, piece).get("logprobs", [])]
            return Response(orjson.dumps({**done, "response": "".join(pieces), **({"logprobs": probs} if probs else {})}),
                            media_type="application/json")
        lines = [_ndjson({"model": body["model"], "created_at": _now(), "response": p, "done": False,
                          **logprobs(body, p)}) for p in pieces]
        return StreamingResponse(iter(lines + [_ndjson({**done, "response": ""})]), media_type="application/x-ndjson")

    async def embed(request: Request) -> Response:
        body = orjson.loads(await request.body())
        state["requests"].append(("embed", body))
        state["headers"].append(("embed", dict(request.headers)))
        if not known(body.get("model", "")):
            return not_found(body.get("model", ""))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = []
        for text in inputs:
            digest = hashlib.sha256(text.encode()).digest()
            raw = [b / 255.0 - 0.5 for b in digest[:embed_dim]]
            norm = sum(v * v for v in raw) ** 0.5 or 1.0
            vectors.append([v / norm for v in raw])
        return Response(orjson.dumps({"model": body["model"], "embeddings": vectors, "total_duration": 1,
                                      "load_duration": 0, "prompt_eval_count": sum(len(t.split()) for t in inputs)}),
                        media_type="application/json")

    app = Starlette(routes=[
        Route("/api/version", version), Route("/api/tags", tags), Route("/api/pull", pull, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]), Route("/api/embed", embed, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]), Route("/api/create", create, methods=["POST"]),
        Route("/", lambda r: Response("Ollama is running"))])
    app.state.standin = state
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default="", help="comma-separated models already 'pulled'")
    parser.add_argument("--gguf", default=None, help="generate with llama.cpp from this GGUF")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    store = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    uvicorn.run(create_app(models, args.gguf, args.token_delay_ms, store=store), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
