"""Issue #23: the gateway's CPU per proxied chat request, on the stack `vilms serve` runs (vilms.serve.server's
protocol under uvicorn, the factory's app). The figures are in bench/results/cost-*.md (`python -m bench.cost`);
these tests pin what the cuts rely on, each failing on the code before them:

- a served gateway settles its heap once started (before: the collector ran every ~13 requests and, until main froze
  the heap after building the app, walked ~90,000 start-up objects about once a second; it never found anything
  to free);
- requests leave no reference cycles behind (what makes that setting safe: nothing waits on the collector);
- a reply with a Content-Length leaves in one send (before: its head and its body in two); a stream's head and a
  HEAD reply still leave at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import socket
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import orjson
import pytest
import uvicorn

from tests.serve.test_hardening import assert_envelope, user
from tests.serve.test_hardening_limits import wait_until
from tests.serve.test_hardening_round2 import HangingEngine
from tests.support import ThreadedServer, free_port, gateway, mock_backend, subprocess_server
from vilms.config.load import build_config
from vilms.serve import heap
from vilms.serve.departure import Departure
from vilms.serve.api import create_app
from vilms.serve.server import GuardedHttpTools, HeadLimits

KEY = "sk-cost-0123456789abcdef"
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    """devkit's mock engine in its own process, so nothing it allocates is counted with the gateway's heap."""
    port = free_port()
    with subprocess_server([sys.executable, "-m", "devkit.mock_backend", "--port", str(port), "--tokens", "4",
                            "--token-delay-ms", "20"], "/v1/models", port) as url:
        yield url


def config(engine: str) -> dict[str, Any]:
    return {"serving": {"engine": "openai", "base-url": engine, "models": [{"name": "m"}]},
            "gateway": {"api-keys": [{"name": "k", "key": KEY}], "log-level": "warning"}}


class Recorder:
    """The connection's real transport, every write and writelines call recorded (one entry each: one send)."""

    def __init__(self, transport: Any, sends: list[bytes]):
        self.transport, self.sends = transport, sends

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))
        self.transport.write(data)

    def writelines(self, parts: Any) -> None:
        parts = [bytes(p) for p in parts]
        self.sends.append(b"".join(parts))
        self.transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class RecordingProtocol(GuardedHttpTools):
    """What `vilms serve` runs, its sends recorded in `SENDS`."""

    SENDS: list[bytes] = []

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(Recorder(transport, self.SENDS))


@contextlib.contextmanager
def served_stack(config_data: dict[str, Any], loop: str) -> Iterator[tuple[tuple[str, int], uvicorn.Server]]:
    """A gateway served as `vilms serve` serves it: its protocol (sends recorded), on uvloop as in production or on
    asyncio."""
    app = create_app(build_config(config_data))
    with ThreadedServer(app, loop=loop, http=functools.partial(RecordingProtocol, limits=HeadLimits()),
                        proxy_headers=False) as served:
        yield ("127.0.0.1", served.port), served.server


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def served(request: Any, engine: str) -> Iterator[tuple[str, int]]:
    with served_stack(config(engine), request.param) as (address, _):
        yield address


def post(path: bytes, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST %s HTTP/1.1" % path, b"host: x", b"content-type: application/json",
            b"authorization: Bearer " + KEY.encode(), b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request on a kept-alive connection and read its whole (Content-Length) answer."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


# --- the heap ----------------------------------------------------------------------------------------------------

def test_a_served_gateway_settles_its_heap_once_started(engine, tmp_path, monkeypatch):
    """Old code left CPython's collector at its default threshold (700): 14% of the served gateway's CPU (perf, c=64)
    before main's freeze of the built app, young collections every ~13 requests after it (~40 µs a request)."""
    import yaml

    from vilms.serve.api import factory

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(engine)))
    monkeypatch.setenv("VILMS_CONFIG", str(path))
    threshold, logger = gc.get_threshold(), logging.getLogger("vilms")
    logged = (logger.handlers[:], logger.level, logger.propagate)  # the factory sets up logging as a worker does
    try:
        with ThreadedServer(factory.app()):
            assert gc.get_threshold()[0] == heap.GEN0_THRESHOLD
            assert gc.get_freeze_count() > 10_000  # start-up's objects, out of the collector's walks
            assert gc.isenabled()  # a cycle that does appear is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        logger.handlers[:], logger.level, logger.propagate = logged


def test_requests_leave_no_reference_cycles(served):
    """Every request on the served stack is freed by reference counting alone (what keeps the raised threshold
    safe). A transport wrapper that held its request's cycle strongly left ~16 objects per request to the
    collector: this failed on it with 523."""
    sock = socket.create_connection(served, timeout=10)
    requests = [post(b"/v1/chat/completions", CHAT),
                post(b"/v1/chat/completions", b'{"model": "m", "messages": []}'),  # 400
                post(b"/v1/chat/completions", CHAT.replace(b'"m"', b'"nope"')),  # 404
                post(b"/v1/chat/completions", b"{bad json"),  # 400
                post(b"/v1/chat/completions", CHAT, b"authorization: Bearer wrong")]  # (the first one counts)
    for request in requests:  # warm: lazily built state is not garbage
        exchange(sock, request)
    gc.collect()
    gc.disable()
    try:
        for _ in range(8):
            for request in requests:
                assert exchange(sock, request).startswith(b"HTTP/1.1 ")
        found = gc.collect()
    finally:
        gc.enable()
        sock.close()
    assert found < 40, f"{found} objects in reference cycles after 40 requests"


# --- one send per sized reply -------------------------------------------------------------------------------------

def test_a_sized_reply_leaves_in_one_send(served):
    """Old code: uvicorn wrote the head when the app started the reply and the body after, two sends (and two
    segments, two wake-ups of the client) for every JSON answer."""
    sock = socket.create_connection(served, timeout=10)
    exchange(sock, post(b"/v1/chat/completions", CHAT))
    RecordingProtocol.SENDS.clear()
    answer = exchange(sock, post(b"/v1/chat/completions", CHAT))
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and orjson.loads(answer.partition(b"\r\n\r\n")[2])["choices"]
    assert RecordingProtocol.SENDS == [answer]
    RecordingProtocol.SENDS.clear()
    with socket.create_connection(served, timeout=10) as sock:
        error = exchange(sock, post(b"/v1/chat/completions", b"{bad"))
    assert error.startswith(b"HTTP/1.1 400 ") and RecordingProtocol.SENDS == [error]


def test_a_stream_head_leaves_before_its_first_chunk(served):
    """A stream is not held: its head goes out alone when the engine's answer opens, each chunk as it comes."""
    sock = socket.create_connection(served, timeout=10)
    RecordingProtocol.SENDS.clear()
    sock.sendall(post(b"/v1/chat/completions", CHAT[:-1] + b', "stream": true}'))
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        data += sock.recv(65536)
    sock.close()
    head = RecordingProtocol.SENDS[0]
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n") and b"transfer-encoding: chunked" in head
    assert len(RecordingProtocol.SENDS) >= 6  # role, 4 tokens, finish, [DONE]: relayed as they came


def test_a_head_reply_is_written_without_a_body(served):
    """HEAD has a Content-Length and no body: its head must not wait for body bytes that never come."""
    sock = socket.create_connection(served, timeout=5)
    sock.sendall(b"HEAD /health_check HTTP/1.1\r\nhost: x\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 ") and answer.endswith(b"\r\n\r\n")


# --- the engine call's bound: aiohttp's own timer, no second one ---------------------------------------------------

@contextlib.contextmanager
def trickling_engine(first_byte_after: float | None) -> Iterator[str]:
    """An engine that answers 200 after `first_byte_after` seconds (None: never) and then sends its body one byte
    every 0.1 s: never silent for long (read-timeout), never done either."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if first_byte_after is None:
                return
            time.sleep(first_byte_after)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
            for _ in range(100):
                time.sleep(0.1)
                conn.sendall(b" ")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("first_byte_after", [None, 0.0], ids=["silent", "trickling"])
def test_a_non_stream_call_is_bounded_by_total_timeout_with_its_own_message(first_byte_after):
    """gateway.total-timeout bounds the whole non-streaming exchange, the reply's body included: a 504 saying so,
    counted as an upstream timeout, the engine's connection closed. Kept as it was when the bound moved from an
    asyncio.timeout around the call to aiohttp's per-request timer."""
    with trickling_engine(first_byte_after) as url, \
            gateway({"serving": {"engine": "openai", "base-url": url, "models": [{"name": "m"}]},
                     "gateway": {"total-timeout": 0.6, "read-timeout": 5}}) as gw:
        before, started = upstream_timeouts(gw.url), time.monotonic()
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": [user("hi")]},
                              timeout=30)
        took = time.monotonic() - started
        error = assert_envelope(response, 504)
        assert error["message"] == "openai engine did not finish within 0.6s" and error["type"] == "upstream_timeout"
        assert 0.5 < took < 4  # not the read-timeout (5 s), not the trickle's end (10 s)
        assert upstream_timeouts(gw.url) == before + 1 and running_gauge(gw.url) == 0


def metric(url: str, pattern: str, key: str | None = None) -> float:
    """The sum of one metric's series matching `pattern` (with a key where the gateway has keys). The registry is
    process-wide: compare before and after."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(url + "/metrics", headers=headers).text
    return sum(float(n) for n in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def running_gauge(url: str, key: str | None = None) -> float:
    return metric(url, r"vilms:num_requests_running\{[^}]*\}", key)


def counted(url: str, status: str, model: str, key: str | None = None) -> float:
    return metric(url, rf'vilms:requests_total\{{[^}}]*model="{model}",route="chat",status="{status}"\}}', key)


def upstream_timeouts(url: str) -> float:
    return metric(url, r'vilms:upstream_errors_total\{[^}]*kind="timeout",model="m"\}')


def test_the_total_timeout_counts_from_the_first_attempt_across_failover():
    """A refused first endpoint is skipped (failover on connection errors) and the next one gets what is left of
    total-timeout, not a fresh one."""
    refused = f"http://127.0.0.1:{free_port()}"
    with trickling_engine(None) as silent, \
            gateway({"serving": {"engine": "openai", "models": [{"name": "m", "base-url": [refused, silent]}]},
                     "gateway": {"total-timeout": 0.6, "read-timeout": 5}}) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": [user("hi")]},
                              timeout=30)
        assert assert_envelope(response, 504)["message"] == "openai engine did not finish within 0.6s"


def test_repeated_header_fields_count_by_their_first(served):
    """The pipeline reads the head's fields in one pass (it walked starlette's header list once per field): of a
    repeated field the first still counts, as starlette's `Headers.get` had it."""
    with socket.create_connection(served, timeout=10) as sock:
        answer = exchange(sock, post(b"/v1/chat/completions", CHAT, b"x-request-id: first-1", b"x-request-id: second"))
        good = b"authorization: Bearer " + KEY.encode()
        wrong_first = post(b"/v1/chat/completions", CHAT, good).replace(good, b"authorization: Bearer wrong", 1)
        refused = exchange(sock, wrong_first)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nx-request-id: first-1\r\n" in answer
    assert refused.startswith(b"HTTP/1.1 401 ")


# --- a caller that leaves: told by the protocol, no task parked on receive() ---------------------------------------

@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_caller_that_leaves_cancels_its_engine_call_on_the_served_stack(loop):
    """The served stack tells a request its client left (vilms.serve.departure) instead of a second task parked on
    receive() (old code: two tasks per request in flight, this failed on `idle + 2`): the engine call is still
    closed at once, counted 499, its slot and gauge released."""
    engine = HangingEngine()
    with ThreadedServer(engine) as server, served_stack(
            {"serving": {"engine": "vllm", "vllm-base-url": server.url, "models": [{"name": "m", "engine": "vllm"}]},
             "gateway": {"api-keys": [{"name": "k", "key": KEY}], "backend-concurrency": 1, "backend-queue": 4,
                         "queue-timeout": 60}}, loop) as (address, served):
        url = "http://%s:%d" % address
        before, idle = counted(url, "499", "m", KEY), tasks(served)
        for i, body in enumerate([CHAT, CHAT[:-1] + b', "stream": true}'] * 2):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(post(b"/v1/chat/completions", body))
            wait_until(lambda: engine.started == i + 1)
            assert tasks(served) == idle + 1  # the request's own task, nothing parked on receive() beside it
            sock.close()
            wait_until(lambda: engine.cancelled == i + 1)
        holder = socket.create_connection(address, timeout=10)  # takes the only slot
        holder.sendall(post(b"/v1/chat/completions", CHAT))
        wait_until(lambda: engine.started == 5)
        queued = socket.create_connection(address, timeout=10)  # waits for it, then leaves
        queued.sendall(post(b"/v1/chat/completions", CHAT))
        wait_until(lambda: running_gauge(url, KEY) == 2)
        queued.close()
        wait_until(lambda: running_gauge(url, KEY) == 1)
        holder.close()
        wait_until(lambda: engine.cancelled == 5 and running_gauge(url, KEY) == 0)
        assert engine.started == 5 and counted(url, "499", "m", KEY) == before + 6


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stream_reader_that_leaves_closes_the_engine_stream_on_the_served_stack(loop):
    with mock_backend(tokens=50, token_delay_ms=100) as slow, served_stack(
            {"serving": {"engine": "openai", "base-url": slow.url, "models": [{"name": "m"}]},
             "gateway": {"api-keys": [{"name": "k", "key": KEY}]}}, loop) as (address, _):
        url = "http://%s:%d" % address
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(post(b"/v1/chat/completions", CHAT[:-1] + b', "stream": true}'))
        assert b"data: " in sock.recv(65536) + sock.recv(65536)
        sock.close()
        wait_until(lambda: slow.backend.stats["streams_abandoned"] == 1)
        wait_until(lambda: running_gauge(url, KEY) == 0)
        assert slow.backend.stats["streams_completed"] == 0


def tasks(server: uvicorn.Server) -> int:
    """Tasks alive on the server's loop (asked on that loop)."""
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # (not this one)

    return asyncio.run_coroutine_threadsafe(count(), server.servers[0].get_loop()).result(5)


def test_a_departure_after_the_client_went_runs_at_once():
    """A request that starts watching after its client left is cancelled all the same."""
    gone, calls = Departure(), []
    gone.add(lambda: calls.append("first"))
    gone.fire()
    gone.add(lambda: calls.append("late"))
    assert calls == ["first", "late"]
