"""The floor under the gateway's cost: the least a relay on the same stack can spend per request.

An ASGI app that reads the body, POSTs it to the engine through the gateway's own aiohttp session (bench/aiohttp_session.make_session,
the config's defaults) and relays the answer, a stream chunk by chunk, served as `vilms serve` serves the gateway
(its guarded httptools protocol, uvloop, the heap settled): no keys, no validation, no metrics, no limits. What the
gateway costs above this is its pipeline; this itself is uvicorn, aiohttp and the kernel (bench/cost.py --floor).

`--client pyreqwest` / `--server granian` (optional installs) and `--client raw` (bench/clients.py's httptools
reference) put another client or server under the same relay: issue #23, bench/results/clients.md.
`--client upstream` is the gateway's own engine client since then (vilms.serve.upstream): the floor under the gateway
of today (bench/results/cost-upstream.md).

    python -m bench.relay_floor --backend http://127.0.0.1:9000 --port 8001 [--client aiohttp] [--server uvicorn]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gateway"))
sys.path.insert(0, str(ROOT))
from vilms.config.load import build_config  # noqa: E402
from vilms.serve import heap  # noqa: E402
from bench.aiohttp_session import make_session  # noqa: E402
from vilms.serve.server import HeadLimits, protocol  # noqa: E402

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def gateway_settings(backend: str) -> dict[str, Any]:
    """The gateway section of a config that names only this engine: every setting at its default."""
    return build_config({"serving": {"engine": "openai", "base-url": backend, "models": [{"name": "m"}]}}).gateway


async def body_of(receive: Any) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    return body


async def answer_json(send: Any, status: int, data: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": JSON + [(b"content-length", b"%d" % len(data))]})
    await send({"type": "http.response.body", "body": data})


class Relay:
    """The relay over aiohttp as the gateway used it before issue #23 (bench/aiohttp_session.make_session). Subclasses put another
    client under it: `open`/`close` at the app's start and stop, `relay` per request."""

    def __init__(self, backend: str):
        self.backend = backend
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["method"] == "GET":
            await answer_json(send, 200, b"{}")
        else:
            await self.relay(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.open()
                heap.settle()
                await send({"type": "lifespan.startup.complete"})
            else:
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def open(self) -> None:
        self.session = make_session(gateway_settings(self.backend))

    async def close(self) -> None:
        assert self.session is not None
        await self.session.close()

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await body_of(receive)
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
        await answer_json(send, answer.status, data)


class ReqwestRelay(Relay):
    """The same relay over pyreqwest (Rust reqwest/hyper on its own tokio thread), configured as make_session is:
    the config's timeouts, idle connections dropped after 4 s, no decompression, no redirects (bench/clients.py)."""

    async def open(self) -> None:
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        gateway = gateway_settings(self.backend)
        self.client = (ClientBuilder().user_agent("vilms-gateway").default_headers({"Accept-Encoding": "identity"})
                       .gzip(False).brotli(False).zstd(False).deflate(False).follow_redirects(False)
                       .connect_timeout(timedelta(seconds=gateway["connect-timeout"]))
                       .read_timeout(timedelta(seconds=gateway["read-timeout"]))
                       .timeout(timedelta(seconds=gateway["stream-timeout"]))
                       .pool_idle_timeout(timedelta(seconds=4)).build())

    async def close(self) -> None:
        await self.client.close()

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await body_of(receive)
        request = self.client.post(self.backend + scope["path"]).headers({"Content-Type": "application/json"})
        async with request.body_bytes(body).build_streamed() as answer:
            reader = answer.body_reader
            if (answer.get_header("content-type") or "").startswith("text/event-stream"):
                await send({"type": "http.response.start", "status": answer.status, "headers": SSE})
                while (chunk := await reader.read_chunk()) is not None:
                    await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            chunks = []
            while (chunk := await reader.read_chunk()) is not None:
                chunks.append(bytes(chunk))
        await answer_json(send, answer.status, b"".join(chunks))


class RawRelay(Relay):
    """The same relay over bench/clients.py's RawPool (httptools, no timeouts, no limits): a reference for how low
    a client could take the floor at all, not a candidate. Streams are relayed whole, as one body."""

    async def open(self) -> None:
        from bench.clients import RawPool

        self.pool = RawPool(self.backend)

    async def close(self) -> None:
        await self.pool.close()

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        status, data = await self.pool.post(scope["path"], await body_of(receive))
        await answer_json(send, status, data)


class UpstreamRelay(Relay):
    """The same relay over the gateway's own client since issue #23 (vilms.serve.upstream, the config's
    settings): the floor under today's gateway. A stream (the body asks for one) is relayed chunk by chunk."""

    async def open(self) -> None:
        from vilms.serve.upstream import make_upstream

        self.upstream = make_upstream(gateway_settings(self.backend))

    async def close(self) -> None:
        await self.upstream.close()

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await body_of(receive)
        answer = await self.upstream.request(self.backend, scope["path"], body)
        if orjson.loads(body).get("stream"):
            await send({"type": "http.response.start", "status": answer.status, "headers": SSE})
            async for chunk in answer:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            answer.release()
            await send({"type": "http.response.body", "body": b""})
            return
        data = b"".join([chunk async for chunk in answer])
        answer.release()
        await answer_json(send, answer.status, data)


CLIENTS = {"aiohttp": Relay, "pyreqwest": ReqwestRelay, "raw": RawRelay, "upstream": UpstreamRelay}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp", help="the upstream HTTP client")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="granian (Rust ASGI server, measurement only): its own HTTP, no head guard")
    args = parser.parse_args()
    app = CLIENTS[args.client](args.backend)
    if args.server == "granian":
        return granian(app, args.port)
    limits = HeadLimits.from_gateway(gateway_settings(args.backend))
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http=protocol(limits),
                access_log=False, log_level="warning", proxy_headers=False, lifespan="on")


def granian(app: Relay, port: int) -> None:
    """One granian worker, uvloop, the same app: what a Rust HTTP server leaves of uvicorn's ~15 %."""
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    async def serve() -> None:
        await Server(app, address="127.0.0.1", port=port, interface=Interfaces.ASGI, http=HTTPModes.http1).serve()
    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
