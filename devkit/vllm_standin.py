"""A stand-in for the vLLM OpenAI server (vLLM's images cannot be pulled here, and vLLM needs a GPU).

Takes vLLM's command line as compose writes it (`--model M --served-model-name N --host H --port P ...`,
other vLLM flags ignored), serves llama.cpp's OpenAI-compatible server on the tiny GGUF under the served
name, and adds vLLM's `/health`.

    python -m devkit.vllm_standin --model /models/x --served-model-name Qwen/Qwen3 --port 8000
"""

from __future__ import annotations

import argparse
import os
from typing import Any

GGUF = os.environ.get("VILMS_STANDIN_GGUF", "/opt/standin/tiny.gguf")


def any_request_id(app: Any) -> Any:
    """vLLM takes any x-request-id (it logs it); llama-cpp-python's server answers a non-UUID one with a 400."""
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"]}
        await app(scope, receive, send)
    return wrapped


def main() -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from starlette.responses import Response

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args, ignored = parser.parse_known_args()
    name = args.served_model_name or args.model
    print(f"vllm stand-in: serving {name} (vLLM flags ignored: {' '.join(ignored) or 'none'})", flush=True)
    app = create_app(server_settings=ServerSettings(host=args.host, port=args.port),
                     model_settings=[ModelSettings(model=GGUF, model_alias=name, n_ctx=1024, n_threads=2,
                                                   embedding=True, kv_overrides=["llama.pooling_type=int:1"],
                                                   verbose=False)])
    app.add_api_route("/health", lambda: Response(status_code=200), methods=["GET"])
    uvicorn.run(any_request_id(app), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
