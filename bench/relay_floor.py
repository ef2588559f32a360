"""The floor under the gateway's cost: the least a relay on the same stack can spend per request.

An ASGI app that reads the body, POSTs it to the engine through the gateway's own aiohttp session (http.make_session,
the config's defaults) and relays the answer, a stream chunk by chunk, served as `vilms serve` serves the gateway
(its guarded httptools protocol, uvloop, the heap settled): no keys, no validation, no metrics, no limits. What the
gateway costs above this is its pipeline; this itself is uvicorn, aiohttp and the kernel (bench/cost.py --floor).

    python -m bench.relay_floor --backend http://127.0.0.1:9000 --port 8001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gateway"))
from vilms.config.load import build_config  # noqa: E402
from vilms.serve import heap  # noqa: E402
from vilms.serve.http import make_session  # noqa: E402
from vilms.serve.server import HeadLimits, protocol  # noqa: E402

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def gateway_settings(backend: str) -> dict[str, Any]:
    """The gateway section of a config that names only this engine: every setting at its default."""
    return build_config({"serving": {"engine": "openai", "base-url": backend, "models": [{"name": "m"}]}}).gateway


class Relay:
    def __init__(self, backend: str):
        self.backend = backend
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": JSON + [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})
        else:
            await self.relay(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = make_session(gateway_settings(self.backend))
                heap.settle()
                await send({"type": "lifespan.startup.complete"})
            else:
                assert self.session is not None
                await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        assert self.session is not None
        async with self.session.post(self.backend + scope["path"], data=body,
                                     headers={"Content-Type": "application/json"}) as answer:
            if answer.content_type == "text/event-stream":
                await send({"type": "http.response.start", "status": answer.status, "headers": SSE})
                async for chunk in answer.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            data = await answer.read()
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": JSON + [(b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    limits = HeadLimits.from_gateway(gateway_settings(args.backend))
    uvicorn.run(Relay(args.backend), host="127.0.0.1", port=args.port, loop="uvloop", http=protocol(limits),
                access_log=False, log_level="warning", proxy_headers=False, lifespan="on")


if __name__ == "__main__":
    main()
