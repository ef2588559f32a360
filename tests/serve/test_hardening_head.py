"""Issue #21, item 1: request heads are bounded in size, field count and time, before the parser's cost grows.

The server under test is what `vilms serve` runs (vilms.serve.server.protocol over uvicorn) on a loopback port.
On the old code (`http="httptools"`, no guard) each attack below was accepted: an 8 MiB header was parsed in full
and answered 200, 150 header fields were answered 200, and a trickled or silent head held its connection open
with no deadline (those tests then fail on their socket timeout).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.support import ThreadedServer, free_port
from vilms.serve.server import HeadLimits, protocol

LIMITS = HeadLimits(max_bytes=16384, max_count=32, timeout=0.5)


async def _echo(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{request.method} {len(request.headers)} {len(body)}")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    app = Starlette(routes=[Route("/echo", _echo, methods=["GET", "POST"])])
    with ThreadedServer(app, http=protocol(LIMITS), lifespan="off") as served:
        yield "127.0.0.1", served.port


def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=5)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything until the server closes (or 5 s of silence fail the test)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _send_all(sock: socket.socket, data: bytes) -> int:
    """Bytes the server took before it closed the connection."""
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:sent + 65536])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_huge_header_is_refused_with_431_without_reading_it(server: Any) -> None:
    sock = _connect(server)
    head = b"GET /echo HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (8 << 20) + b"\r\n\r\n"
    _send_all(sock, head)
    answer = _answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"gateway.max-header-bytes" in answer


def test_too_many_header_fields_are_refused_with_431(server: Any) -> None:
    sock = _connect(server)
    fields = b"".join(b"x-h%d: 1\r\n" % i for i in range(150))
    sock.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n" + fields + b"\r\n")
    answer = _answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"gateway.max-headers" in answer


def test_trickled_head_gets_408_at_the_deadline(server: Any) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n")
    started = time.monotonic()
    answer = b""
    for _ in range(20):  # one header line every 0.1 s: never a whole head
        try:
            sock.sendall(b"x-slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.1)
    answer = _answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert time.monotonic() - started < 4.5


def test_trickled_second_head_on_a_kept_alive_connection_gets_408(server: Any) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 "), first
    sock.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n")  # and never the blank line
    answer = first + _answer(sock)
    sock.close()
    assert answer.index(b"HTTP/1.1 200 ") < answer.index(b"HTTP/1.1 408 "), answer[:400]


def test_silent_connection_is_closed_at_the_deadline(server: Any) -> None:
    sock = _connect(server)
    assert _answer(sock) == b""  # closed by the server (a socket timeout would raise here instead)
    sock.close()


def test_ordinary_requests_pass_keep_alive_pipelined_and_with_large_bodies(server: Any) -> None:
    sock = _connect(server)
    body = b"b" * 300_000  # far over max-header-bytes, sent with its head in one go
    post = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    get = b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n"
    sock.sendall(post + get + post + get + b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    answer = _answer(sock)
    sock.close()
    assert answer.count(b"HTTP/1.1 200 ") == 5, answer[:500]
    assert answer.count(b"POST 2 300000") == 2 and answer.count(b"GET 1 0") == 2


def test_head_just_under_the_limit_passes(server: Any) -> None:
    sock = _connect(server)
    filler = b"x-fill: " + b"f" * (LIMITS.max_bytes - 200) + b"\r\n"
    sock.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + filler + b"\r\n")
    answer = _answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_vilms_serve_refuses_a_256_mib_header_fast_and_health_check_never_stalls(tmp_path):
    """The issue's attack against `vilms serve` itself (uvloop, the CLI's protocol settings): one 256 MiB header.

    Old code (httptools unguarded) kept answering /health_check with stalls of up to 25 s for 144 s. Now the
    connection is refused after 64 KiB; a prober on its own connection measures the worst /health_check during the
    attack, against the same measurement during a harmless request (the machine's noise), best of 3 runs.
    """
    import os
    import sys

    import httpx
    import yaml

    from tests.support import ROOT, subprocess_server

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"serving": {"engine": "openai", "base-url": "http://127.0.0.1:9",
                                                  "models": [{"name": "m"}]}}))
    port = free_port()
    args = [sys.executable, "-m", "vilms", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), str(ROOT)])}

    def attack(size: int) -> tuple[bytes, float, float]:
        lags: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                client.get("/health_check")
                while not stop.is_set() or not lags:
                    started = time.perf_counter()
                    assert client.get("/health_check").status_code == 200
                    lags.append(time.perf_counter() - started)

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        chunk = b"a" * (1 << 20)
        try:
            sock.sendall(b"GET /health_check HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: ")
            for _ in range(size >> 20):
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _answer(sock)
        elapsed = time.perf_counter() - started
        sock.close()
        stop.set()
        prober.join()
        return answer, elapsed, max(lags)

    with subprocess_server(args, "/health_check", port, env=env) as url:
        added = []
        for _ in range(3):
            _, _, noise = attack(0)
            answer, elapsed, lag = attack(256 << 20)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert elapsed < 1.0, elapsed
            added.append(lag - noise)
            if added[-1] < 0.05:
                break
    assert min(added) < 0.05, f"the attack delayed health_check by {[round(x * 1000) for x in added]} ms"
