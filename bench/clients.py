"""Upstream HTTP clients compared: the client process's own CPU µs per request (issue #23).

The gateway spends ~35 % of its CPU in aiohttp's client request. This asks whether another well-kept client spends
less for the gateway's exact upstream call: POST /v1/chat/completions (104 B JSON, Content-Type application/json,
keep-alive) to a fast stand-in engine in another process (devkit/mock_backend: ~300 B JSON reply, held 0 or 20 ms),
c=64 concurrent callers on one uvloop event loop, each reply read whole and its status checked.

Each client runs in a fresh child process; the figure is that process's utime + stime (getrusage: all its threads,
so a Rust runtime's threads count) over the measured window, after a warm-up, divided by the replies completed.
Clients, interleaved in every round so load drift hits all alike:
- aiohttp: the gateway's own session (bench/aiohttp_session.make_session, config defaults) called as engines/base.py `open`
  and `_read` call it (BytesPayload, the exchange timeout, iter_any, release);
- pyreqwest (Rust reqwest/hyper/tokio), aiosonic (pure Python, asyncio); niquests when `--niquests-path` names a
  `pip install --target` folder (it brings urllib3-future, which replaces urllib3 in an environment it joins);
- upstream: the gateway's own client since issue #23 (vilms.serve.upstream), as engines/base.py calls it;
- raw: a reference only, not a candidate: an asyncio Protocol over httptools' response parser with a keep-alive
  stack of connections, no timeouts, no checks: what the kernel and parsing alone cost.

    pip install pyreqwest==0.15.1 aiosonic==1.3.3       (measured versions; not project dependencies)
    pip install --target /tmp/niquests niquests==3.21.2  (kept out of the venv: urllib3-future replaces urllib3)
    python -m bench.clients [--hold-ms 20,0] [--rounds 3] [--duration 5] [--clients aiohttp,pyreqwest,...]
                            [--niquests-path /tmp/niquests]     -> bench/results/clients-alone.{md,json}
    python -m bench.clients --child aiohttp --url http://127.0.0.1:9000 --duration 5   (one measurement, JSON out)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "gateway"))

CHAT = {"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in one word."}]}
PAYLOAD = json.dumps(CHAT).encode()
PATH = "/v1/chat/completions"
HEADERS = {"User-Agent": "vilms-gateway", "Accept-Encoding": "identity", "Content-Type": "application/json"}
CLIENTS = ("aiohttp", "pyreqwest", "pyreqwest-stream", "aiosonic", "niquests", "raw", "upstream")

Call = Callable[[], Awaitable[int]]  # one request: returns the reply's length (status checked inside)


async def aiohttp_client(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiohttp
    from bench.aiohttp_session import make_session
    from bench.relay_floor import gateway_settings

    settings = gateway_settings(url)
    session = make_session(settings)
    base = session.timeout  # the exchange timeout engines/base.py built before issue #23's own client
    timing = aiohttp.ClientTimeout(total=settings["total-timeout"], sock_read=base.sock_read,
                                   sock_connect=base.sock_connect)

    async def call() -> int:
        data = aiohttp.BytesPayload(PAYLOAD, content_type="application/json")
        response = await session.post(url + PATH, data=data, timeout=timing)
        assert response.status == 200, response.status
        chunks = [chunk async for chunk in response.content.iter_any()]
        response.release()
        return len(b"".join(chunks))
    return call, session.close


async def pyreqwest_client(url: str, stream: bool = False) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    client = (ClientBuilder().user_agent("vilms-gateway").default_headers({"Accept-Encoding": "identity"})
              .gzip(False).brotli(False).zstd(False).deflate(False).follow_redirects(False)
              .connect_timeout(timedelta(seconds=5)).read_timeout(timedelta(seconds=300))
              .timeout(timedelta(seconds=600)).pool_idle_timeout(timedelta(seconds=4)).build())
    headers = {"Content-Type": "application/json"}

    async def call() -> int:
        response = await client.post(url + PATH).headers(headers).body_bytes(PAYLOAD).build().send()
        assert response.status == 200, response.status
        return len(bytes(await response.bytes()))
    async def streamed() -> int:  # as engines/base.py `_read` would need it: chunk by chunk, bounded
        async with client.post(url + PATH).headers(headers).body_bytes(PAYLOAD).build_streamed() as response:
            assert response.status == 200, response.status
            reader, chunks = response.body_reader, []
            while (chunk := await reader.read_chunk()) is not None:
                chunks.append(bytes(chunk))
        return len(b"".join(chunks))
    return (streamed if stream else call), client.close


async def aiosonic_client(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiosonic

    from aiosonic.pools import PoolConfig

    pool = PoolConfig(size=256, max_conn_requests=None, max_conn_idle_ms=4000)
    client = aiosonic.HTTPClient(aiosonic.TCPConnector(pool_configs={":default": pool}))

    async def call() -> int:
        response = await client.post(url + PATH, data=PAYLOAD, headers=HEADERS)
        assert response.status_code == 200, response.status_code
        return len(await response.content())

    async def close() -> None:
        await client.connector.cleanup()
    return call, close


async def niquests_client(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import niquests

    session = niquests.AsyncSession(pool_maxsize=256)
    session.headers.update(HEADERS)

    async def call() -> int:
        response = await session.post(url + PATH, data=PAYLOAD)
        assert response.status_code == 200, response.status_code
        return len(response.content)
    return call, session.close


class RawPool:
    """The lower bound, a reference and not a candidate: httptools' response parser, a LIFO stack of idle keep-alive
    connections, no timeouts, no limits, no streaming (a reply is handed over whole)."""

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.idle: list[_RawConn] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.idle:
            conn = self.idle.pop()
        else:
            conn = (await asyncio.get_running_loop().create_connection(_RawConn, self.host, self.port))[1]
        conn.body, conn.done = [], asyncio.get_running_loop().create_future()
        conn.transport.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: vilms-gateway\r\n"
                             b"Accept-Encoding: identity\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"\r\n%s" % (path.encode(), self.host.encode(), self.port, len(body), body))
        status, data = await conn.done
        self.idle.append(conn)
        return status, data

    async def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()


class _RawConn(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.done: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result((self.parser.get_status_code(), b"".join(self.body)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


async def upstream_client(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The gateway's own client since issue #23 (vilms.serve.upstream), called as engines/base.py `open` and
    `_read` call it: a deadline per exchange, the reply read chunk by chunk, released."""
    from vilms.serve.upstream import make_upstream
    from bench.relay_floor import gateway_settings

    settings = gateway_settings(url)
    upstream = make_upstream(settings)
    total = settings["total-timeout"]

    async def call() -> int:
        reply = await upstream.request(url, PATH, PAYLOAD, deadline=upstream.loop.time() + total)
        assert reply.status == 200, reply.status
        chunks = [chunk async for chunk in reply]
        reply.release()
        return len(b"".join(chunks))
    return call, upstream.close


async def raw_client(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    pool = RawPool(url)

    async def call() -> int:
        status, body = await pool.post(PATH, PAYLOAD)
        assert status == 200, status
        return len(body)
    return call, pool.close


FACTORIES = {"aiohttp": aiohttp_client, "pyreqwest": pyreqwest_client, "aiosonic": aiosonic_client,
             "pyreqwest-stream": lambda url: pyreqwest_client(url, stream=True),
             "niquests": niquests_client, "raw": raw_client, "upstream": upstream_client}


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(name: str, url: str, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    """`concurrency` callers in a loop; CPU and replies counted over the window after the warm-up only."""
    call, close = await FACTORIES[name](url)
    count, errors, stop = [0], [0], [False]

    async def caller() -> None:
        while not stop[0]:
            try:
                await call()
                count[0] += 1
            except Exception:  # noqa: BLE001 - counted, reported; a bench must not die on one
                errors[0] += 1
    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    start_count, start_cpu, start = count[0], cpu_now(), time.monotonic()
    await asyncio.sleep(duration)
    done, cpu, wall = count[0] - start_count, cpu_now() - start_cpu, time.monotonic() - start
    stop[0] = True
    await asyncio.gather(*tasks)
    await close()
    return {"client": name, "requests": done, "rps": round(done / wall, 1), "errors": errors[0],
            "cpu_us_per_request": round(cpu * 1e6 / max(done, 1), 1), "cores": round(cpu / wall, 2)}


def child(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(drive(args.child, args.url, args.concurrency, args.duration, args.warmup))
    print(json.dumps(result))


def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    if name == "niquests":
        env["PYTHONPATH"] = os.pathsep.join([args.niquests_path, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "bench.clients", "--child", name, "--url", url, "--duration",
                          str(args.duration), "--concurrency", str(args.concurrency)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=args.duration + 120)
    if run.returncode:
        raise RuntimeError(f"{name}: {run.stderr[-1500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


MODULES = {"aiohttp": "aiohttp", "pyreqwest": "pyreqwest", "pyreqwest-stream": "pyreqwest", "aiosonic": "aiosonic",
           "raw": "httptools", "upstream": "httptools"}


def installed(names: list[str]) -> list[str]:
    """The clients this environment has (the candidates are not project dependencies; see the docstring)."""
    from importlib.util import find_spec

    have = [n for n in names if n == "niquests" or find_spec(MODULES[n]) is not None]
    for name in sorted(set(names) - set(have)):
        print(f"skipped {name}: `pip install {MODULES[name]}` to measure it", file=sys.stderr)
    return have


def rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from bench.run import PY, Proc
    from tests.support import free_port, wait_http

    rows: dict[str, list[dict[str, Any]]] = {}
    for hold in args.hold_ms:
        port = free_port()
        backend = Proc(f"clients-backend-{hold:g}ms", [PY, "-m", "devkit.mock_backend", "--port", str(port),
                                                        "--latency-ms", str(hold)])
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", 30)
            for _ in range(args.rounds):
                for name in args.clients:
                    rows.setdefault(f"{hold:g}ms {name}", []).append(measure(name, f"http://127.0.0.1:{port}", args))
        finally:
            backend.stop()
    return rows


def table(rows: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['date']}, {meta['machine']}, load average {meta['load_before']} before / {meta['load_after']} "
             f"after; {meta['rounds']} rounds x {meta['duration_s']} s per client (c={meta['concurrency']}), "
             "clients interleaved in each round; medians (all rounds in brackets).",
             f"Command: `{meta['command']}`", "",
             "| engine hold | client | client CPU µs / request | req/s | client cores | errors |", "|---|---|---|---|---|---|"]
    for key, runs in rows.items():
        hold, name = key.split(" ", 1)
        cpu = [r["cpu_us_per_request"] for r in runs]
        lines.append(f"| {hold} | {name} | {statistics.median(cpu):.0f} ({', '.join(f'{c:.0f}' for c in cpu)}) | "
                     f"{statistics.median(r['rps'] for r in runs):.0f} | "
                     f"{statistics.median(r['cores'] for r in runs):.2f} | {sum(r['errors'] for r in runs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=CLIENTS, help="(internal) measure this client once, print JSON")
    parser.add_argument("--url", help="(with --child) the engine")
    parser.add_argument("--clients", default="aiohttp,pyreqwest,pyreqwest-stream,aiosonic,raw")
    parser.add_argument("--niquests-path", default=None, help="a `pip install --target` folder holding niquests")
    parser.add_argument("--hold-ms", default="20,0", help="the stand-in engine's hold before each reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stem", default="clients-alone")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    args.clients = installed([c for c in args.clients.split(",") if c])
    if args.niquests_path and "niquests" not in args.clients:
        args.clients.append("niquests")
    args.hold_ms = [float(h) for h in args.hold_ms.split(",")]
    from bench.run import RESULTS

    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)  # the stand-in engine's log
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
            "duration_s": args.duration, "concurrency": args.concurrency,
            "load_before": round(os.getloadavg()[0], 1),
            "command": "python -m bench.clients " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = rounds(args)
    meta["load_after"] = round(os.getloadavg()[0], 1)
    text = table(rows, meta)
    (out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    (out / f"{args.stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
