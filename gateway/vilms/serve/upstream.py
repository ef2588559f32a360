"""The engines' upstream HTTP client: a pool of keep-alive HTTP/1.1 connections on asyncio + httptools.

Why not a library: every well-kept client cost 2.5-25 times what a bare asyncio Protocol over httptools' parser
costs per proxied request (bench/results/clients.md: aiohttp ~115 µs of CPU, pyreqwest 61 and +7 per stream chunk,
this shape 24), and the client was about half the gateway's floor. So, as uvicorn does on the server side, the
parser is httptools and the pool and the exchange are ours (vilms.serve.upstream_conn), cut to what the engine
adapters use: POST a JSON body or GET a probe, read the status and the body, time out as the gateway's connect,
read and total settings always meant (the aiohttp session before it is bench/aiohttp_session.py now). Engines are
on the Docker network or loopback: http://, or https:// with the system's CAs for a remote one; no proxies.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from vilms.serve.upstream_conn import (ConnectFailed, ConnectTimeout, Conn, DeadlineExceeded, Disconnected,
                                       HeadTimeout, ProtocolError, Reply, SilenceTimeout, UpstreamError,
                                       UpstreamTimeout)

# Idle connections are dropped after 4 s: uvicorn-based engines (vLLM, the stand-ins) close theirs after 5 s, and a
# request written into a connection the engine is closing fails (the stale retry below covers the rest of the race).
IDLE_SECONDS = 4.0
INF = math.inf
Body = bytes | list[bytes | memoryview]  # a request body: one buffer, or the pieces a large body was made of
ONE_WRITE_MAX = 65536  # bodies up to this are copied behind the head (one write); larger ones are written as they are
_FIXED = b"User-Agent: vilms-gateway\r\nAccept-Encoding: identity\r\n"


class UnsupportedURL(UpstreamError):
    """An engine URL the client does not speak (http:// and https:// only)."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's CAs, hostname checked: made once (loading the CA store costs milliseconds)."""
    return ssl.create_default_context()


@dataclass
class Target:
    """One engine base URL, parsed once: where to connect and the request heads made for it, by method and path."""

    host: str
    port: int
    prefix: str
    host_header: str
    tls: bool = False  # https://: an engine behind TLS (a remote OpenAI-compatible server), verified as browsers do
    auth: bytes = b""  # user:password in the URL, sent as Basic authorization (as aiohttp did)
    heads: dict[tuple[bytes, str], bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, base: str) -> "Target":
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsupportedURL(f"engine URL {base!r}: the gateway's engine client speaks http:// and https://")
        tls = parts.scheme == "https"
        auth = b""
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = b"Authorization: Basic %s\r\n" % base64.b64encode(user)
        return cls(parts.hostname, parts.port or (443 if tls else 80), parts.path.rstrip("/"),
                   parts.netloc.rpartition("@")[2], tls, auth)

    def head(self, method: bytes, path: str) -> bytes:
        """The request line and the headers every call to this path carries, up to the per-call ones."""
        key = (method, path)
        head = self.heads.get(key)
        if head is None:
            head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s" % (method, (self.prefix + path).encode(),
                                                            self.host_header.encode("idna"), _FIXED, self.auth)
            if method == b"POST":
                head += b"Content-Type: application/json\r\n"
            self.heads[key] = head
        return head


def request_bytes(target: Target, method: bytes, path: str, body: Body | None,
                  request_id: str | None) -> tuple[bytes, Body]:
    """The request as (head and body in one buffer, b"") for the small bodies of nearly every call: one
    transport.write, one send(). A large body (images) is not copied into a new buffer: (head, body), two writes;
    nor is one in pieces (vilms.serve.large: a 64 MiB body serialised in short calls), a write per piece."""
    head = target.head(method, path)
    extra = b""
    if request_id and request_id.isascii() and request_id.isprintable():
        extra = b"x-request-id: %s\r\n" % request_id.encode()
    if body is None:
        return head + extra + b"\r\n", b""
    if isinstance(body, list):
        return b"%s%sContent-Length: %d\r\n\r\n" % (head, extra, sum(len(piece) for piece in body)), body
    if len(body) > ONE_WRITE_MAX:
        return b"%s%sContent-Length: %d\r\n\r\n" % (head, extra, len(body)), body
    return b"%s%sContent-Length: %d\r\n\r\n%s" % (head, extra, len(body), body), b""


class Upstream:
    """Per (host, port) a LIFO stack of idle keep-alive connections (the warmest first; idle ones expire after
    `idle` s); at most `limit` open in all, callers beyond it wait in FIFO order and are handed a connection or a
    free slot as one comes back."""

    def __init__(self, limit: int, connect_timeout: float, read_timeout: float, idle: float = IDLE_SECONDS):
        self.limit, self.connect_timeout, self.read_timeout, self.idle = limit, connect_timeout, read_timeout, idle
        self.loop = asyncio.get_running_loop()
        self.targets: dict[str, Target] = {}
        self.stacks: dict[tuple[str, int], list[Conn]] = {}
        self.waiters: deque[tuple[tuple[str, int], asyncio.Future[Conn | None]]] = deque()
        self.open = 0  # connections open or being opened, idle ones included
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(self, base: str, path: str, body: Body | None = None, *, request_id: str | None = None,
                      deadline: float = INF, head_deadline: float = INF) -> Reply:
        """One exchange: POST `body` (GET when None) to base+path and return the reply once its head is read.

        Deadlines are loop times. A request is sent again, once, on a fresh connection only where the engine cannot
        have seen it: the kept-alive connection was found closing before a byte was written, or a GET (a probe) on a
        reused connection ended before any reply byte. A POST that was written is never sent twice (the engine may
        already be generating), as aiohttp did for non-idempotent methods.
        """
        target = self.targets.get(base)
        if target is None:
            target = self.targets[base] = Target.parse(base)
        data, rest = request_bytes(target, b"GET" if body is None else b"POST", path, body, request_id)
        key = (target.host, target.port)
        conn = await self.acquire(target, key, min(deadline, head_deadline), head_deadline < deadline)
        for attempt in (0, 1):
            conn.send(data, rest, deadline, head_deadline)
            try:
                await conn.head()
                return Reply(conn)
            except Disconnected:
                unseen = conn.unsent or (body is None and conn.uses > 1 and not conn.got_byte)
                if attempt or not unseen:
                    self.drop(conn)
                    raise
                self.discard(conn)  # its slot is kept for the fresh connection
                conn = await self.connect_in_slot(target, key, min(deadline, head_deadline), head_deadline < deadline)
            except BaseException:
                self.drop(conn)
                raise
        raise AssertionError("unreachable")

    # --- the pool -------------------------------------------------------------------------------------------------
    async def acquire(self, target: Target, key: tuple[str, int], deadline: float, head_bound: bool) -> Conn:
        if self.closed:
            raise Disconnected("the gateway is shutting down")
        stack = self.stacks.get(key)
        now = self.loop.time()
        while stack:
            conn = stack.pop()
            if not conn.lost and now - conn.idle_since < self.idle:
                conn.busy = True
                return conn
            self.discard(conn)
            self.open -= 1
        if self.open >= self.limit and not self.waiters:
            self.evict_one()
        if self.open < self.limit and not self.waiters:
            self.open += 1
            return await self.connect_in_slot(target, key, deadline, head_bound)
        got = await self.wait_turn(key, deadline, head_bound)
        if got is not None:
            return got
        return await self.connect_in_slot(target, key, deadline, head_bound)

    async def wait_turn(self, key: tuple[str, int], deadline: float, head_bound: bool) -> Conn | None:
        """Queue for a connection to `key` (returned) or a free slot (None: the slot is counted, connect in it)."""
        turn: asyncio.Future[Conn | None] = self.loop.create_future()
        entry = (key, turn)
        self.waiters.append(entry)
        taken = False
        try:
            async with asyncio.timeout_at(None if deadline == INF else deadline):
                got = await turn
            taken = True
            return got
        except TimeoutError:
            raise (HeadTimeout if head_bound else DeadlineExceeded)("no engine connection came free in time") from None
        finally:
            if taken:
                pass
            elif turn.done() and not turn.cancelled() and turn.exception() is None:
                self.pass_on(turn.result())  # handed one, but this caller is gone: the next waiter takes it
            elif entry in self.waiters:  # (cancelling the caller cancelled `turn` too)
                self.waiters.remove(entry)

    def pass_on(self, conn: Conn | None) -> None:
        if conn is None:
            self.open -= 1
            self.wake_one()
        else:
            conn.busy = False
            self.put_back(conn)

    async def connect_in_slot(self, target: Target, key: tuple[str, int], deadline: float, head_bound: bool) -> Conn:
        """Open a connection in a slot already counted in `open` (freed again when the connect fails)."""
        until = min(deadline, self.loop.time() + self.connect_timeout)
        conn = Conn(self, key, self.read_timeout)
        try:
            async with asyncio.timeout_at(until):
                await self.loop.create_connection(lambda: conn, target.host, target.port,
                                                  ssl=tls_context() if target.tls else None)
        except TimeoutError:
            self.free_slot()
            if until < deadline:
                raise ConnectTimeout(f"no connection to {target.host}:{target.port} within "
                                     f"{self.connect_timeout:g}s") from None
            raise (HeadTimeout if head_bound else DeadlineExceeded)("engine connection not made in time") from None
        except OSError as exc:
            self.free_slot()
            raise ConnectFailed(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        except BaseException:
            self.free_slot()
            raise
        conn.busy = True
        return conn

    def put_back(self, conn: Conn) -> None:
        """A connection whose reply was read to its end: to the first waiter for its host, else onto its stack."""
        conn.busy = False
        if self.closed:
            return self.drop(conn)
        while self.waiters and self.waiters[0][1].done():
            self.waiters.popleft()
        if self.waiters:
            key, turn = self.waiters[0]
            if key == conn.key:
                self.waiters.popleft()
                conn.busy = True
                return turn.set_result(conn)
            return self.drop(conn)  # another host waits: this slot is worth more to it
        conn.idle_since = self.loop.time()
        self.stacks.setdefault(conn.key, []).append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(self.idle, self.sweep)

    def drop(self, conn: Conn) -> None:
        """Close a connection and free its slot (the first waiter gets it)."""
        self.discard(conn)
        self.free_slot()

    def discard(self, conn: Conn) -> None:
        conn.busy = False
        conn.lost = True
        conn.disarm()
        if conn.transport is not None:
            if conn.writing is not None or conn.transport.get_write_buffer_size():
                conn.transport.abort()  # close() would wait to flush a body the engine may never read (review)
            else:
                conn.transport.close()

    def free_slot(self) -> None:
        self.open -= 1
        self.wake_one()

    def wake_one(self) -> None:
        while self.waiters and self.open < self.limit:
            _, turn = self.waiters.popleft()
            if not turn.done():
                self.open += 1
                turn.set_result(None)

    def forget_idle(self, conn: Conn) -> None:
        """An idle connection the engine closed: off its stack, its slot free."""
        stack = self.stacks.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)
            self.free_slot()

    def evict_one(self) -> None:
        """Close the oldest idle connection of any host, to open one to another host within the limit."""
        oldest = min((stack[0] for stack in self.stacks.values() if stack), key=lambda c: c.idle_since, default=None)
        if oldest is not None:
            self.stacks[oldest.key].remove(oldest)
            self.discard(oldest)
            self.open -= 1

    def sweep(self) -> None:
        """Close what has been idle for `idle` s; one timer for the whole pool, re-armed while anything is idle."""
        self.sweeper = None
        now = self.loop.time()
        for stack in self.stacks.values():
            while stack and now - stack[0].idle_since >= self.idle:
                self.discard(stack.pop(0))
                self.free_slot()
        oldest = min((stack[0].idle_since for stack in self.stacks.values() if stack), default=None)
        if oldest is not None:
            self.sweeper = self.loop.call_at(oldest + self.idle, self.sweep)

    async def close(self) -> None:
        """Close every idle connection and refuse new calls; replies still being read close as they finish."""
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for stack in self.stacks.values():
            while stack:
                self.discard(stack.pop())
                self.open -= 1
        while self.waiters:
            _, turn = self.waiters.popleft()
            if not turn.done():
                turn.set_exception(Disconnected("the gateway is shutting down"))


def make_upstream(gateway: dict[str, Any]) -> Upstream:
    """The gateway's one engine client, from its config section; create it inside the running event loop."""
    return Upstream(gateway["max-connections"], gateway["connect-timeout"], gateway["read-timeout"])


__all__ = ["ConnectFailed", "ConnectTimeout", "DeadlineExceeded", "Disconnected", "HeadTimeout", "ProtocolError",
           "Reply", "SilenceTimeout", "UnsupportedURL", "Upstream", "UpstreamError", "UpstreamTimeout",
           "make_upstream"]
