"""A recording stand-in for an OpenAI-compatible engine with vLLM's extra routes.

vLLM itself needs a GPU; the llama.cpp server (tests' real engine) has no /v1/responses, /v1/rerank or
/v1/completions echo. This one answers those routes in vLLM's shapes with deterministic content and logs
every request (path, body, headers) in `state["requests"]`, so pass-through can be checked byte for byte.

    python -m devkit.openai_standin --port 8001
"""

from __future__ import annotations

import argparse
import time
from typing import Any, AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

WORDS = "alpha bravo charlie delta echo foxtrot".split()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_object(body: dict[str, Any], text: str, status: str) -> dict[str, Any]:
    return {"id": "resp_standin", "object": "response", "created_at": int(time.time()), "status": status,
            "model": body["model"], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"),
            "output": [{"type": "message", "id": "msg_standin", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}],
            "usage": _usage(3, len(text.split()))}


def _event(seq: int, kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": seq, **fields}) \
        + b"\n\n"


def response_events(body: dict[str, Any], words: list[str]) -> list[bytes]:
    start = {**response_object(body, "", "in_progress"), "output": []}
    item = {"type": "message", "id": "msg_standin", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": "msg_standin", "output_index": 0, "content_index": 0}
    events = [("response.created", {"response": start}), ("response.output_item.added", {"output_index": 0, "item": item}),
              ("response.content_part.added", {**where, "part": part})]
    events += [("response.output_text.delta", {**where, "delta": w, "logprobs": []}) for w in words]
    final = response_object(body, "".join(words), "completed")
    done_part = final["output"][0]["content"][0]
    events += [("response.output_text.done", {**where, "text": done_part["text"], "logprobs": []}),
               ("response.content_part.done", {**where, "part": done_part}),
               ("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
               ("response.completed", {"response": final})]
    return [_event(i, kind, **fields) for i, (kind, fields) in enumerate(events)]


def rerank_scores(query: str, documents: list[str]) -> list[float]:
    """Share of the query's words found in each document: deterministic and order-revealing."""
    words = set(query.lower().split())
    return [len(words & set(d.lower().split())) / max(len(words), 1) for d in documents]


def create_app(models: list[str], responses: bool = True) -> Starlette:
    state: dict[str, Any] = {"models": list(models), "requests": []}

    async def record(request: Request) -> dict[str, Any]:
        body = orjson.loads(await request.body())
        state["requests"].append((request.url.path, body, dict(request.headers)))
        return body

    def unknown(body: dict[str, Any]) -> Response | None:
        if body.get("model") in state["models"]:
            return None
        return _json({"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                                "code": 404}}, status=404)

    async def model_list(request: Request) -> Response:
        return _json({"object": "list", "data": [{"id": m, "object": "model"} for m in state["models"]]})

    async def responses_route(request: Request) -> Response:
        body = await record(request)
        if (missing := unknown(body)) is not None:
            return missing
        words = [w + " " for w in WORDS[: int(body.get("max_output_tokens") or 3)]]
        if body.get("stream"):
            return StreamingResponse(iter(response_events(body, words)), media_type="text/event-stream")
        return _json(response_object(body, "".join(words), "completed"))

    async def rerank(request: Request) -> Response:
        body = await record(request)
        if (missing := unknown(body)) is not None:
            return missing
        docs = [d if isinstance(d, str) else d.get("text", "") for d in body["documents"]]
        scores = rerank_scores(body["query"], docs)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: body.get("top_n") or len(docs)]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": docs[i]}} if body.get("return_documents", True) else {})} for i in order]
        return _json({"id": "rerank-standin", "model": body["model"], "results": results,
                      "usage": {"total_tokens": sum(len(d.split()) for d in docs)}})

    async def completions(request: Request) -> Response:
        body = await record(request)
        if (missing := unknown(body)) is not None:
            return missing
        words = [w + " " for w in WORDS[: int(body.get("max_tokens") or 16)]]
        head = {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return _json({**head, "choices": [{"index": 0, "text": "".join(words), "logprobs": None,
                                               "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 2, "completion_tokens": len(words),
                                    "total_tokens": 2 + len(words)}})

        async def events() -> AsyncIterator[bytes]:
            for i, w in enumerate(words):
                last = i == len(words) - 1
                choice = {"index": 0, "text": w, "logprobs": None, "finish_reason": "length" if last else None}
                yield b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [Route("/v1/models", model_list), Route("/v1/rerank", rerank, methods=["POST"]),
              Route("/rerank", rerank, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"])]
    if responses:
        routes.append(Route("/v1/responses", responses_route, methods=["POST"]))
    app = Starlette(routes=routes)
    app.state.standin = state
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--models", default="standin-model")
    args = parser.parse_args()
    uvicorn.run(create_app(args.models.split(",")), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
