"""vilms.serve.upstream, the engines' own HTTP client (issue #23), against real local servers: devkit's stand-in
engine under uvicorn, and small asyncio servers written here that misbehave on purpose (close mid-body, send gzip,
go silent, close a kept-alive connection). Each test runs its own event loop (asyncio.run)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time
import zlib
from typing import Any, Awaitable, Callable

import orjson
import pytest

from tests.support import mock_backend
from vilms.serve.upstream import (ConnectFailed, ConnectTimeout, DeadlineExceeded, Disconnected, HeadTimeout,
                                  ProtocolError, SilenceTimeout, UnsupportedURL, Upstream)
from vilms.serve.upstream_conn import INFLATE_STEP, MAX_HEAD, PAUSE_ABOVE

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
STREAM = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Script"], Awaitable[None]]


class Script:
    """A loopback server whose every connection runs `handler`; counts connections and keeps request heads."""

    def __init__(self, handler: Handler):
        self.handler, self.connections, self.heads, self.closed = handler, 0, [], 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()  # type: ignore[union-attr]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """One request (head and Content-Length body), or b"" at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        self.heads.append(head)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    while await script.request(reader):
        writer.write(ok(b'{"ok":1}'))


async def read_all(reply: Any) -> bytes:
    return b"".join([chunk async for chunk in reply])


def run(coro: Awaitable[Any]) -> Any:
    """The test's own event loop; a hang (a timeout that never fires) fails at 10 s instead of stalling the run."""
    return asyncio.run(asyncio.wait_for(coro, 10))


def pool(**kw: Any) -> Upstream:
    return Upstream(kw.pop("limit", 8), kw.pop("connect_timeout", 2.0), kw.pop("read_timeout", 5.0), **kw)


# --- replies from the stand-in engine ----------------------------------------------------------------------------

def test_content_length_and_chunked_replies_from_the_stand_in_engine_on_one_kept_alive_connection():
    """A non-stream answer (Content-Length) and a stream (chunked, uvicorn) read whole; released connections are
    reused (one connection for all five calls) and the request carries the headers the engines are sent."""
    with mock_backend(tokens=4) as engine:
        async def main() -> None:
            upstream = pool()
            for _ in range(2):
                reply = await upstream.request(engine.url, "/v1/chat/completions", CHAT, request_id="req-1")
                assert reply.status == 200
                assert orjson.loads(await read_all(reply))["choices"][0]["message"]["content"] == "tok " * 4
                reply.release()
                reply = await upstream.request(engine.url, "/v1/chat/completions", STREAM)
                text = await read_all(reply)
                reply.release()
                assert text.count(b"data: ") == 7 and text.endswith(b"data: [DONE]\n\n")
            reply = await upstream.request(engine.url, "/_stats")  # a GET
            assert orjson.loads(await reply.read(65536))["requests"] == 4
            assert upstream.open == 1 and len(upstream.stacks[("127.0.0.1", engine.port)]) == 1
            await upstream.close()
        run(main())
        assert engine.backend.last_request["messages"][0]["content"] == "hi"


def test_the_request_head_and_one_write():
    """Host, User-Agent, Accept-Encoding identity, Content-Type, Content-Length, x-request-id; head and body reach
    the engine as one segment (one transport.write)."""
    seen: list[bytes] = []

    async def first_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        seen.append(await reader.read(65536))
        writer.write(ok(b"{}"))

    async def main() -> None:
        async with Script(first_read) as url:
            upstream = pool()
            reply = await upstream.request(url + "/prefix", "/v1/x", b'{"a":1}', request_id="abc")
            await reply.read(100)
            await upstream.close()
    run(main())
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /prefix/v1/x HTTP/1.1" and body == b'{"a":1}'
    assert set(lines[1:]) >= {b"User-Agent: vilms-gateway", b"Accept-Encoding: identity", b"Content-Length: 7",
                              b"Content-Type: application/json", b"x-request-id: abc"}
    assert any(line.startswith(b"Host: 127.0.0.1:") for line in lines)


@pytest.mark.parametrize("pieces", [False, True], ids=["one-buffer", "pieces"])
def test_a_large_body_arrives_whole(pieces):
    """A body above ONE_WRITE_MAX (an image) is written after the head, not copied behind it; a body in pieces (a
    large one serialised in short calls, vilms.serve.large) is written piece by piece with their summed length:
    either arrives intact."""
    big = bytes(range(256)) * 4097
    body = [big[:1], memoryview(big)[1:70000], big[70000:]] if pieces else big
    got: list[bytes] = []

    async def echo_size(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        got.append((await script.request(reader)).partition(b"\r\n\r\n")[2])
        writer.write(ok(b"%d" % len(got[0])))

    async def main() -> None:
        async with Script(echo_size) as url:
            assert await (await pool().request(url, "/a", body)).read(100) == b"%d" % len(big)
    run(main())
    assert got == [big]


def test_a_large_body_to_a_slow_reader_arrives_whole_and_the_connection_is_kept():
    """A large body (pieces) is written a slice per loop turn, waiting while the transport is paused: a reader
    that takes 64 KiB per turn still gets every byte in order, and the connection serves the next request."""
    big = bytes(range(256)) * 65536  # 16 MiB: more than the loopback socket buffers hold
    got: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        while head := await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b"":
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            data = bytearray()
            while len(data) < length:
                data += await reader.read(min(65536, length - len(data)))
                await asyncio.sleep(0)
            got.append(bytes(data))
            writer.write(ok(b"%d" % len(data)))

    script = Script(slow)

    async def main() -> None:
        async with script as url:
            upstream = pool()
            for _ in range(2):
                body = [big[:1 << 20], memoryview(big)[1 << 20:], b""]
                assert await (await upstream.request(url, "/a", body)).read(100) == b"%d" % len(big)
    run(main())
    assert got == [big, big] and script.connections == 1


def test_an_engine_that_answers_before_reading_the_body_has_its_connection_aborted():
    """An engine that answers (413) without reading a large body and then neither reads nor closes: the writer
    ends when the reply is released and the connection is aborted, not closed (close() waits to flush what the
    engine will never read: the writer task, its 64 MiB and the socket were kept for good; review)."""
    stop = asyncio.Event()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1 << 20)
        await asyncio.sleep(0.3)  # (sequencing, not timing) the gateway's writer fills the socket and pauses
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
        await writer.drain()
        await stop.wait()

    async def main() -> None:
        async with Script(early) as url:
            upstream = pool()
            reply = await upstream.request(url, "/a", [bytes(1 << 20)] * 64)
            writer = reply.conn.writing  # type: ignore[union-attr]
            assert reply.status == 413 and await reply.read(100) == b"no"
            assert writer is not None  # still writing when the reply came
            await asyncio.wait_for(writer, 5)
            assert upstream.open == 0
            stop.set()
    run(main())


def test_http_and_https_only_and_credentials_in_the_url_sent_as_basic_auth():
    """ftp:// is refused; https:// is spoken as TLS (against a plain-HTTP server the handshake fails: a connect
    failure, the next URL may be tried); user:password in the URL becomes Basic authorization, as aiohttp sent it."""
    async def main() -> None:
        with pytest.raises(UnsupportedURL, match="http:// and https://"):
            await pool().request("ftp://engine:8000", "/v1/models")
        script = Script(keep_alive_ok)
        async with script as url:
            with pytest.raises(ConnectFailed):
                await pool().request(url.replace("http://", "https://"), "/a", b"{}")
            creds = url.replace("http://", "http://us%40er:p%3Ass@")
            assert await (await pool().request(creds, "/a", b"{}")).read(100) == b'{"ok":1}'
        assert any(b"Authorization: Basic dXNAZXI6cDpzcw==\r\n" in head for head in script.heads)  # us@er:p:ss
    run(main())


# --- the pool ------------------------------------------------------------------------------------------------------

def test_idle_connections_expire():
    """Idle longer than `idle`: closed by the pool (the engine sees it) and the next call opens a fresh one."""
    script = Script(keep_alive_ok)
    run(with_script(script, main_for(script, 0.2)))
    assert script.connections == 2


def main_for(script: Script, idle: float) -> Callable[[str], Awaitable[None]]:
    async def body(url: str) -> None:
        upstream = pool(idle=idle)
        await (await upstream.request(url, "/a", b"{}")).read(100)
        assert upstream.open == 1
        await asyncio.sleep(idle + 0.3)  # a state change, not a timing: the sweep is due after `idle`
        assert upstream.open == 0 and script.closed == 1  # the engine saw the idle connection go
        await (await upstream.request(url, "/a", b"{}")).read(100)
        await upstream.close()
    return body


async def with_script(script: Script, body: Callable[[str], Awaitable[None]]) -> None:
    async with script as url:
        await body(url)


def test_the_pool_limit_holds_and_waiters_are_served_in_order():
    """limit=2 and 5 concurrent calls: never more than 2 connections, and the queued calls reach the engine in the
    order they queued."""
    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        while await script.request(reader):
            await script.release.wait()  # type: ignore[attr-defined]
            writer.write(ok(b"{}"))

    async def main() -> None:
        script = Script(held)
        script.release = asyncio.Event()  # type: ignore[attr-defined]
        async with script as url:
            upstream = pool(limit=2)

            async def call(i: int) -> None:
                await (await upstream.request(url, "/a", b"{}", request_id=f"r{i}")).read(100)

            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(call(i)))
                await asyncio.sleep(0.02)  # orders the calls
            assert upstream.open == 2 and len(upstream.waiters) == 3 and script.connections == 2
            script.release.set()  # type: ignore[attr-defined]
            await asyncio.gather(*tasks)
            assert script.connections == 2 and upstream.open == 2
            ids = [head.split(b"x-request-id: ")[1].split(b"\r\n")[0] for head in script.heads]
            assert ids == [b"r0", b"r1", b"r2", b"r3", b"r4"]
            await upstream.close()
    run(main())


def test_a_waiter_that_gives_up_passes_its_turn_on():
    """A queued call cancelled (its caller left) leaves the queue; the slot goes to the next one."""
    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        while await script.request(reader):
            await asyncio.sleep(0.1)
            writer.write(ok(b"{}"))

    async def main() -> None:
        async with Script(held) as url:
            upstream = pool(limit=1)
            first = asyncio.create_task(upstream.request(url, "/a", b"{}"))
            await asyncio.sleep(0.02)
            leaving = asyncio.create_task(upstream.request(url, "/a", b"{}"))
            staying = asyncio.create_task(upstream.request(url, "/a", b"{}"))
            await asyncio.sleep(0.02)
            leaving.cancel()
            await asyncio.sleep(0.01)
            assert len(upstream.waiters) == 1  # it left the queue at once
            await (await first).read(100)
            await (await staying).read(100)
            assert leaving.cancelled() and not upstream.waiters and upstream.open == 1
            await upstream.close()
    run(main())


# --- stale keep-alive connections ----------------------------------------------------------------------------------

def closes_on(nth: int, partial: bytes = b"") -> Handler:
    """Answers requests on a connection, but on its `nth` request sends `partial` (maybe nothing) and closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        count = 0
        while await script.request(reader):
            count += 1
            if count == nth:
                writer.write(partial)
                await writer.drain()
                return
            writer.write(ok(b'{"ok":1}'))
    return handler


def test_a_written_post_is_never_sent_twice_a_probe_is_retried_once_on_a_fresh_connection():
    """The engine closes a kept-alive connection after reading the second request: a POST (it may be generating) is
    Disconnected and not sent again; a GET probe is sent once more on a fresh connection."""
    async def main(body: bytes | None) -> Script:
        script = Script(closes_on(2))
        async with script as url:
            upstream = pool()
            assert await (await upstream.request(url, "/a", body)).read(100) == b'{"ok":1}'
            if body is None:
                assert await (await upstream.request(url, "/a", body)).read(100) == b'{"ok":1}'
            else:
                with pytest.raises(Disconnected):
                    await upstream.request(url, "/a", body)
            await upstream.close()
        return script
    posted = run(main(b"{}"))
    assert posted.connections == 1 and len(posted.heads) == 2  # written once, never again
    probed = run(main(None))
    assert probed.connections == 2 and len(probed.heads) == 3  # the stale one, then the retry on a fresh one


def test_interim_replies_are_skipped_and_the_final_one_is_read_by_its_own_caller():
    """103 Early Hints / 100 Continue before the real reply (aiohttp skipped them): each caller gets its own 200
    on one kept-alive connection, never the previous caller's."""
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        count = 0
        while await script.request(reader):
            count += 1
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            for _ in range(20):  # (one loop: let the gateway's side read the interim replies on their own)
                await asyncio.sleep(0)
            writer.write(ok(b'{"caller":%d}' % count))

    async def main() -> list[bytes]:
        async with Script(early_hints) as url:
            upstream = Upstream(1, 5, 5)
            answers = []
            for _ in range(3):
                reply = await upstream.request(url, "/a", b"{}")
                assert reply.status == 200
                answers.append(await reply.read(100))
            await upstream.close()
            return answers
    assert run(main()) == [b'{"caller":1}', b'{"caller":2}', b'{"caller":3}']


def test_bytes_after_a_whole_reply_end_the_connection_and_the_next_call_is_served_fresh():
    """An engine that sends more than its reply: the caller gets exactly its reply, the connection is not reused
    (the extra bytes are never read as the next caller's reply), and the next call is answered on a fresh one."""
    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
        while await script.request(reader):
            writer.write(ok(b'{"a":1}') + b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nX")

    async def main() -> tuple[list[bytes], int]:
        script = Script(extra)
        async with script as url:
            upstream = Upstream(1, 5, 5)
            got = []
            for _ in range(2):
                reply = await upstream.request(url, "/a", b"{}", deadline=upstream.loop.time() + 5)
                got.append(await reply.read(100))
            await upstream.close()
        return got, script.connections
    got, connections = run(main())
    assert got == [b'{"a":1}', b'{"a":1}'] and connections == 2


@pytest.mark.parametrize("partial", [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{"])
def test_no_retry_once_the_engine_sent_a_byte(partial):
    async def main() -> Script:
        script = Script(closes_on(2, partial))
        async with script as url:
            upstream = pool()
            await (await upstream.request(url, "/a", b"{}")).read(100)
            with pytest.raises(Disconnected):
                await (await upstream.request(url, "/a", b"{}")).read(100)
            assert upstream.open == 0
            await upstream.close()
        return script
    script = run(main())
    assert script.connections == 1 and len(script.heads) == 2


def test_no_retry_on_a_fresh_connection():
    async def main() -> Script:
        script = Script(closes_on(1))
        async with script as url:
            with pytest.raises(Disconnected):
                await pool().request(url, "/a", b"{}")
        return script
    script = run(main())
    assert script.connections == 1 and len(script.heads) == 1


# --- bodies: broken, compressed, large ---------------------------------------------------------------------------

def test_a_reply_cut_mid_body_is_disconnected_and_not_reused():
    async def main() -> None:
        async with Script(closes_on(1, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")) as url:
            upstream = pool()
            reply = await upstream.request(url, "/a", b"{}")
            with pytest.raises(Disconnected):
                await read_all(reply)
            reply.close()
            assert upstream.open == 0
    run(main())


def test_a_body_that_ends_with_the_connection():
    async def main() -> None:
        async with Script(closes_on(1, b"HTTP/1.1 200 OK\r\n\r\nall of it")) as url:
            upstream = pool()
            reply = await upstream.request(url, "/a", b"{}")
            assert await read_all(reply) == b"all of it"
            reply.release()
            assert upstream.open == 0  # not kept: it is closed
    run(main())


@pytest.mark.parametrize("encoding,compress", [(b"gzip", gzip.compress), (b"deflate", zlib.compress)])
def test_compressed_replies_inflate_in_bounded_steps(encoding, compress):
    """A bad engine's gzip/deflate reply (the gateway asks for identity): inflated, never more than INFLATE_STEP per
    read, so a reader with a limit stops a bomb there (the gateway's 502: test_hardening_round2)."""
    plain = b"x" * (3 * INFLATE_STEP + 5)

    async def main() -> None:
        async with Script(closes_on(2, ok(compress(plain), b"content-encoding: " + encoding + b"\r\n"))) as url:
            upstream = pool()
            await (await upstream.request(url, "/a", b"{}")).read(100)
            reply = await upstream.request(url, "/a", b"{}")
            chunks = [chunk async for chunk in reply]
            reply.release()
            assert b"".join(chunks) == plain and max(map(len, chunks)) <= INFLATE_STEP and len(chunks) >= 4
            await upstream.close()
    run(main())


def test_a_reply_that_does_not_inflate_is_a_protocol_error():
    async def main() -> None:
        async with Script(closes_on(1, ok(b"not gzip at all", b"content-encoding: gzip\r\n"))) as url:
            reply = await pool().request(url, "/a", b"{}")
            with pytest.raises(ProtocolError):
                await read_all(reply)
            reply.close()
    run(main())


def test_chunked_trailers_that_never_end_are_a_protocol_error():
    """Trailers after the last chunk go through the same unbounded header code in the parser: bounded too."""
    endless = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-trailer: "
               + b"a" * (8 * MAX_HEAD))

    async def main() -> None:
        async with Script(closes_on(1, endless)) as url:
            reply = await pool().request(url, "/a", b"{}")
            with pytest.raises(ProtocolError, match="trailers"):
                await read_all(reply)
            reply.close()
    run(main())


def test_a_reply_head_that_never_ends_is_a_protocol_error_and_the_connection_closed():
    """A misbehaving engine's endless header (the parser has no limit of its own): refused past MAX_HEAD bytes, not
    parsed on; a head just under it is read as usual."""
    endless = b"HTTP/1.1 200 OK\r\nx-junk: " + b"a" * (8 * MAX_HEAD)
    long_ok = ok(b"{}", b"x-junk: %s\r\n" % (b"a" * (MAX_HEAD - 200)))

    async def main() -> None:
        async with Script(closes_on(1, endless)) as url:
            with pytest.raises(ProtocolError, match="head or trailers longer"):
                await pool().request(url, "/a", b"{}")
        async with Script(closes_on(1, long_ok)) as url:
            assert await (await pool().request(url, "/a", b"{}")).read(100) == b"{}"
    run(main())


def test_a_slow_reader_pauses_the_socket():
    """8 MiB sent at once, nobody reading: reading stops near PAUSE_ABOVE buffered, and all of it arrives after."""
    big = bytes(range(256)) * 32768

    async def main() -> None:
        async with Script(closes_on(1, ok(big))) as url:
            reply = await pool().request(url, "/a", b"{}")
            await asyncio.sleep(0.3)  # a state change: the socket is full, reading paused
            conn = reply.conn
            assert conn is not None and conn.paused and conn.buffered < PAUSE_ABOVE + 2**20
            assert await read_all(reply) == big
    run(main())


# --- timeouts ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def full_backlog() -> Any:
    """A listening socket whose accept queue is full: a further connect is never answered (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for sock in fillers + [listener]:
            sock.close()


def test_connect_timeout_and_refused():
    async def main() -> None:
        upstream = pool(connect_timeout=0.2)
        with full_backlog() as url:
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                await upstream.request(url, "/a", b"{}")
            assert time.monotonic() - started < 2
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        with pytest.raises(ConnectFailed):
            await upstream.request(f"http://127.0.0.1:{port}", "/a", b"{}")
        assert upstream.open == 0
    run(main())


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    await script.request(reader)
    await reader.read()  # until the client goes


async def head_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    await script.request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await reader.read()


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    await script.request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    for _ in range(1000):
        await asyncio.sleep(0.05)
        writer.write(b" ")


@pytest.mark.parametrize("handler,kw,error", [
    (silent, {}, SilenceTimeout),
    (head_then_silent, {}, SilenceTimeout),
    (trickle, {"deadline": 0.4}, DeadlineExceeded),
    (silent, {"head_deadline": 0.2}, HeadTimeout),
    (silent, {"deadline": 0.2}, DeadlineExceeded),
], ids=["silent-before-head", "silent-mid-body", "total-while-trickling", "head", "total-before-head"])
def test_every_timeout_ends_the_exchange_and_closes_the_connection(handler, kw, error):
    """read-timeout is silence (0.3 s here), not duration: a trickle every 50 ms is never silent, the deadline
    ends it. The engine sees the connection closed."""
    async def main() -> Script:
        script = Script(handler)
        async with script as url:
            upstream = pool(read_timeout=0.3)
            now = upstream.loop.time()
            bounds = {name: now + value for name, value in kw.items()}
            started = time.monotonic()
            with pytest.raises(error):
                reply = await upstream.request(url, "/a", b"{}", **bounds)
                try:
                    await read_all(reply)
                finally:
                    reply.close()
            assert time.monotonic() - started < 2.5 and upstream.open == 0
            await asyncio.sleep(0.05)
        return script
    script = run(main())
    assert script.closed == 1


def test_one_timer_per_exchange_however_many_reads():
    """Timers were a measurable share of the gateway's CPU: a 16-token stream read chunk by chunk arms one."""
    with mock_backend(tokens=16, token_delay_ms=1) as engine:
        async def main() -> int:
            upstream = pool()
            loop = asyncio.get_running_loop()
            armed = 0
            real = loop.call_at

            def counting(*args: Any, **kw: Any) -> Any:
                nonlocal armed
                armed += 1
                return real(*args, **kw)

            await (await upstream.request(engine.url, "/v1/chat/completions", CHAT)).read(65536)  # connected first
            loop.call_at = counting  # type: ignore[method-assign]
            reads = 0
            for _ in range(5):
                reply = await upstream.request(engine.url, "/v1/chat/completions", STREAM)
                async for _chunk in reply:
                    reads += 1
                reply.release()
            loop.call_at = real  # type: ignore[method-assign]
            assert reads >= 5 * 10
            return armed
        assert run(main()) <= 5 + 1  # (+1: the pool's idle sweep)


# --- cancelling --------------------------------------------------------------------------------------------------

async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    await script.request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    while not reader.at_eof():
        writer.write(b"6\r\ndata:x\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        if reader._buffer or reader.at_eof():  # type: ignore[attr-defined]
            break
    await reader.read()


def test_closing_mid_stream_and_cancelling_close_the_connection():
    """How the gateway stops an engine generating: the engine sees its connection go, in both cases."""
    async def main() -> Script:
        script = Script(endless)
        async with script as url:
            upstream = pool()
            reply = await upstream.request(url, "/a", STREAM)
            async for _chunk in reply:
                break
            reply.close()
            waiting = asyncio.create_task(upstream.request(url + "/", "/b", STREAM))
            await asyncio.sleep(0.05)
            ongoing = await waiting
            reader = asyncio.create_task(read_all(ongoing))
            await asyncio.sleep(0.05)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            ongoing.close()
            for _ in range(100):
                if script.closed == 2:
                    break
                await asyncio.sleep(0.01)
            assert upstream.open == 0
        return script
    assert run(main()).closed == 2


def test_cancelling_before_the_head_closes_the_connection():
    async def main() -> Script:
        script = Script(silent)
        async with script as url:
            upstream = pool()
            task = asyncio.create_task(upstream.request(url, "/a", b"{}"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                if script.closed:
                    break
                await asyncio.sleep(0.01)
            assert upstream.open == 0
        return script
    assert run(main()).closed == 1
