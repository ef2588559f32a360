"""One keep-alive HTTP/1.1 connection to an engine and the reply read from it (vilms.serve.upstream is the pool).

Why hand-written: aiohttp as the gateway called it cost ~115 µs of CPU per proxied request, its request and response
objects, header multidicts, a timer per read and its pool; an asyncio Protocol feeding httptools' response parser
(the C parser uvicorn uses on the server side) costs ~24 (bench/results/clients.md). The parser is the well-kept
library; what is here is the exchange: write the request, collect the reply's status and the two headers the
gateway needs, hand body chunks to one reader with flow control, and judge every timeout from one timer handle.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from typing import Any

import httptools

PAUSE_ABOVE = 262144  # buffered reply bytes before the socket stops being read (the reader is slower than the engine)
INFLATE_STEP = 262144  # a compressed reply is inflated at most this much per read: a gzip bomb stays bounded
WRITE_SLICE = 262144  # request-body bytes written per event-loop turn (a large body: vilms.serve.large)
MAX_HEAD = 65536  # bytes a reply head, or its chunked trailers, may take (aiohttp: 8 KiB a line): past it, ProtocolError
INF = math.inf


class UpstreamError(Exception):
    """Every failure of an engine call; the engine adapters map each kind to the gateway's error (engines/base.py)."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unresolvable, gateway.connect-timeout): the next URL may be tried."""


class ConnectTimeout(ConnectFailed):
    """The engine did not accept the connection within gateway.connect-timeout."""


class UpstreamTimeout(UpstreamError):
    """A timeout after the connection was made (see the subclasses)."""


class SilenceTimeout(UpstreamTimeout):
    """The engine sent nothing for gateway.read-timeout while a read was due."""


class DeadlineExceeded(UpstreamTimeout):
    """The exchange outlived its whole bound (total-timeout for a non-stream call, stream-timeout for a stream)."""


class HeadTimeout(UpstreamTimeout):
    """A stream's reply head did not come within total-timeout."""


class Disconnected(UpstreamError):
    """The engine closed the connection before its reply was complete."""


class ProtocolError(UpstreamError):
    """The engine's reply is not HTTP/1.1 the parser accepts, or its compressed body does not inflate."""


class Conn(asyncio.Protocol):
    """One connection: the parser's callbacks fill the current exchange's fields; one reader waits on `waiter`.

    Timeouts: one TimerHandle per exchange, armed at the earliest of its deadlines; when it fires early (data kept
    coming) it re-arms from the fields. A read does not touch the timer, it only stamps `last`."""

    def __init__(self, pool: Any, key: tuple[str, int], read_timeout: float):
        self.pool, self.key, self.read_timeout = pool, key, read_timeout
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = self.busy = False
        self.idle_since = 0.0
        self.uses = 0  # exchanges sent on it: a stale keep-alive connection can only be one with uses > 1
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.writing: asyncio.Task[None] | None = None  # a large request body still being written
        self.write_paused = False
        self.writable: asyncio.Future[None] | None = None
        self.reset(INF, INF)

    def reset(self, deadline: float, head_deadline: float) -> None:
        """Fresh per-exchange state."""
        self.status = 0
        self.encoding = b""
        self.framed = self.headers_done = self.complete = self.paused = self.got_byte = self.interim = False
        self.unsent = False
        self.keep_alive = True
        self.chunks: list[bytes] = []
        self.buffered = self.unframed = 0
        self.exc: UpstreamError | None = None
        self.deadline, self.head_deadline = deadline, head_deadline
        self.last = self.loop.time()

    # --- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection cannot be trusted again
            self.lost = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self.got_byte, self.last = True, self.loop.time()
        self.unframed += len(data)  # bytes since the last body bytes: a head or trailers (on_body sets it to 0)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.complete:
                self.fail(ProtocolError(f"unreadable reply: {exc}"))
            self.keep_alive = False  # (complete: bytes after the reply, see on_message_begin)
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.unframed > MAX_HEAD and not self.complete:
            # a head or trailers that never end: httptools has no limit, and builds each value by concatenation
            self.fail(ProtocolError(f"engine reply head or trailers longer than {MAX_HEAD} bytes"))
            self.transport.close()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_writer()

    def wake_writer(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def eof_received(self) -> None:
        return None  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.wake_writer()
        if not self.busy:
            self.pool.forget_idle(self)
            return
        if self.complete or self.exc is not None:
            return
        if self.headers_done and not self.framed:  # a body that ends where the connection ends
            self.keep_alive = False
            self.on_message_complete()
            return
        self.fail(Disconnected("engine closed the connection" + (f" ({exc})" if exc else "")))

    # --- httptools callbacks --------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after this exchange's whole reply: stop parsing, never reuse the connection
            raise ProtocolError("engine sent bytes after its reply")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-encoding":
            self.encoding = value.strip().lower()
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:  # 100 Continue, 103 Early Hints: the reply follows
            self.interim, self.encoding, self.framed = True, b"", False
            return
        if self.status in (204, 304) or self.status == 101:
            self.framed = True
        self.headers_done = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        self.unframed = 0
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_ABOVE and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.wake()

    def on_message_complete(self) -> None:
        if self.interim:  # the end of an interim (1xx) reply: the real one is next
            self.interim = False
            return
        self.complete = True
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.disarm()
        self.wake()
        self.wake_writer()  # an engine that answered before reading the whole body: the writer stops

    # --- the exchange ---------------------------------------------------------------------------------------------
    def send(self, data: bytes, rest: bytes | list[bytes | memoryview], deadline: float, head_deadline: float) -> None:
        """Write the whole request (head and body in one write; `rest`: a large body, written after) and arm the
        exchange's one timer."""
        self.busy = True
        self.uses += 1
        self.reset(deadline, head_deadline)
        if self.uses > 1:  # a fresh parser for every exchange: nothing of the last reply can leak into this one
            self.parser = httptools.HttpResponseParser(self)
        if self.lost or self.transport.is_closing():  # type: ignore[union-attr]
            self.unsent = True  # nothing written: the request may go on a fresh connection
            self.fail(Disconnected("engine closed the connection"))
            return
        self.transport.write(data)  # type: ignore[union-attr]
        if isinstance(rest, list):  # a large body's pieces (vilms.serve.large): paced, never joined
            self.writing = self.loop.create_task(self.write_body(rest))
        elif rest:
            self.transport.write(rest)  # type: ignore[union-attr]
        self.arm()

    async def write_body(self, pieces: list[bytes | memoryview]) -> None:
        """A large body written WRITE_SLICE bytes per loop turn, waiting while the transport is paused. Why: written
        at once, uvloop kept what the socket did not take and wrote it in one callback as fast as the engine read
        it: a 64 MiB text to a local engine held the loop (and the GIL) 40-60 ms (bench/bigbodies.py, perf sched).
        Stops when the exchange ends first (the engine answered or failed early); the connection is then not
        reused (`release`: only a connection with nothing left to write goes back to the pool)."""
        transport, turn = self.transport, 0
        try:
            for piece in pieces:
                view = memoryview(piece)
                for at in range(0, len(view), WRITE_SLICE):
                    if turn >= WRITE_SLICE or self.write_paused:  # never after the last write: see `release`
                        turn = 0
                        await self.drained()
                    if self.lost or self.complete or self.exc is not None or transport.is_closing():  # type: ignore
                        self.keep_alive = False
                        return
                    part = view[at:at + WRITE_SLICE]
                    transport.write(part)  # type: ignore[union-attr]
                    turn += len(part)
        finally:
            self.writing = None

    async def drained(self) -> None:
        """The next loop turn, or (the transport paused: the engine reads slower than we write) its resume."""
        if not self.write_paused:
            await asyncio.sleep(0)
            return
        self.writable = self.loop.create_future()
        try:
            await self.writable
        finally:
            self.writable = None

    def arm(self) -> None:
        when = min(self.deadline, self.last + self.read_timeout)
        if not self.headers_done:
            when = min(when, self.head_deadline)
        if when < INF:
            self.timer = self.loop.call_at(when, self.on_timer)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_timer(self) -> None:
        self.timer = None
        now = self.loop.time()
        if now >= self.deadline:
            self.fail(DeadlineExceeded("engine exchange took too long"))
        elif not self.headers_done and now >= self.head_deadline:
            self.fail(HeadTimeout("engine did not answer in time"))
        elif not self.paused and now >= self.last + self.read_timeout:
            self.fail(SilenceTimeout("engine went silent"))
        else:
            if self.paused:  # the reader is behind: silence is not the engine's, count it from now
                self.last = now
            self.arm()
            return
        self.transport.close()  # type: ignore[union-attr]

    def fail(self, exc: UpstreamError) -> None:
        if self.exc is None and not self.complete:
            self.exc = exc
        self.keep_alive = False
        self.disarm()
        self.wake()
        self.wake_writer()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until the parser or the timer has news for the one reader."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def head(self) -> None:
        while not self.headers_done:
            if self.exc is not None:
                raise self.exc
            await self.wait()

    def take(self) -> bytes:
        """Everything buffered, as one bytes object; reading resumes once the reader has caught up."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks, self.buffered = [], 0
        if self.paused:
            self.paused, self.last = False, self.loop.time()
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data


class Reply:
    """An engine's reply: `status`, then the body through `async for chunk in reply` (aiohttp's `iter_any()`
    shape: whatever has arrived, in one piece). Ends with `release()` (the connection goes back to the pool when the
    reply was read to its end and keep-alive holds) or `close()` (it is dropped: closing mid-stream is how the
    gateway stops an engine generating). Both may be called more than once."""

    __slots__ = ("conn", "status", "inflater")

    def __init__(self, conn: Conn):
        self.conn: Conn | None = conn
        self.status = conn.status
        enc = conn.encoding
        self.inflater = (zlib.decompressobj(31) if enc in (b"gzip", b"x-gzip")
                         else zlib.decompressobj(15) if enc == b"deflate" else None)

    def __aiter__(self) -> "Reply":
        return self

    async def __anext__(self) -> bytes:
        conn = self.conn
        if conn is None:
            raise StopAsyncIteration
        inflater = self.inflater
        while True:
            if inflater is not None and inflater.unconsumed_tail:
                out = self.inflate(inflater.unconsumed_tail)
                if out:
                    return out
            if conn.chunks:
                data = conn.take()
                if inflater is None:
                    return data
                out = self.inflate(data)
                if out:
                    return out
                continue
            if conn.exc is not None:
                raise conn.exc
            if conn.complete:
                raise StopAsyncIteration
            await conn.wait()

    def inflate(self, data: bytes) -> bytes:
        try:
            return self.inflater.decompress(data, INFLATE_STEP)  # type: ignore[union-attr]
        except zlib.error as exc:
            raise ProtocolError(f"engine reply does not inflate: {exc}") from exc

    async def read(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (ProtocolError beyond), then released; for small replies (probes)."""
        chunks, size = [], 0
        try:
            async for chunk in self:
                size += len(chunk)
                if size > limit:
                    raise ProtocolError(f"engine reply is larger than {limit} bytes")
                chunks.append(chunk)
        except BaseException:
            self.close()
            raise
        self.release()
        return b"".join(chunks)

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            reusable = conn.complete and conn.keep_alive and not conn.lost and conn.writing is None and (
                self.inflater is None or not self.inflater.unconsumed_tail)
            conn.pool.put_back(conn) if reusable else conn.pool.drop(conn)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.pool.drop(conn)
