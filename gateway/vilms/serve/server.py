"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools parser behind a guard on the request head.

Why: httptools (llhttp) has no limit on header size and its cost grows faster than linearly with one huge
header (issue #21: one 256 MiB header stalled /health_check for up to 25 s at a time for 144 s), and uvicorn
arms no timer between a connection's first byte and the end of its head, so trickled headers held
connections forever. The guard counts head bytes before the parser sees them (an over-long head is answered
431 after at most `max_header_bytes` of parsing), counts header fields, and gives every head a deadline (408).
Measured against h11 with its incomplete-event limit on the secure bench (bench/results/secure-headers.md):
h11 costs more CPU per request, so the hot path keeps httptools.
Each request's reply with a Content-Length leaves in one send (vilms.serve.onesend), and a request is told when
its client leaves (vilms.serve.departure).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vilms.serve import departure
from vilms.serve.onesend import OneSendTransport


@dataclass(frozen=True)
class HeadLimits:
    """gateway.max-header-bytes, gateway.max-headers, gateway.header-timeout."""

    max_bytes: int = 65536
    max_count: int = 100
    timeout: float = 10.0

    @classmethod
    def from_gateway(cls, gateway: Mapping[str, Any]) -> "HeadLimits":
        return cls(int(gateway["max-header-bytes"]), int(gateway["max-headers"]), float(gateway["header-timeout"]))


class _TooManyHeaders(Exception):
    pass


class GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol whose request heads are bounded in bytes, fields and time.

    Per request the guard adds one counter check per received chunk and one length check when the head is
    complete; the deadline timer is armed only for a head that did not arrive in one chunk (and once per
    connection, at its opening), so the usual one-chunk request pays no timer. Nothing is re-parsed.
    """

    def __init__(self, *args: Any, limits: HeadLimits = HeadLimits(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.in_head = True  # the next bytes belong to a request head
        self.head_bytes = 0
        self.head_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is closed at the head deadline too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and cycle.disconnected:  # (uvicorn's mark: lost before the reply was complete)
            gone = cycle.scope.get("extensions", {}).get(departure.EXTENSION)
            if gone is not None:
                gone.fire()

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            super().data_received(data)
            return
        room = self.limits.max_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            super().data_received(data)
        else:
            self.head_bytes = self.limits.max_bytes
            super().data_received(data[:room])  # the head may end in the allowed part; the rest is body or a next head
            if self.transport.is_closing():
                return
            if self.in_head:
                self._refuse(431, b"request header fields too large (gateway.max-header-bytes)")
                return
            self.data_received(data[room:])
            return
        if self.in_head and self.head_timer is None and self._idle() and not self.transport.is_closing():
            self._arm()  # a head spread over several chunks: it has header-timeout from here

    def send_400_response(self, msg: str) -> None:
        if self.headers is not None and len(self.headers) > self.limits.max_count:
            self._refuse(431, b"too many request header fields (gateway.max-headers)")
            return
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._disarm()
        if len(self.headers) > self.limits.max_count:
            raise _TooManyHeaders()  # a parser error: answered 431 by send_400_response above
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # the new request's cycle: one send per reply,
            cycle.transport = OneSendTransport(self.transport, cycle)  # and told when its client leaves
            cycle.scope.setdefault("extensions", {})[departure.EXTENSION] = departure.Departure()

    def on_message_complete(self) -> None:
        self.in_head, self.head_bytes = True, 0  # bytes after this message start the next head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.in_head and self.head_bytes and self.head_timer is None and not self.transport.is_closing():
            self._arm()  # part of the next head came while this response was still being written

    def _idle(self) -> bool:
        """No response in progress: a pipelined client's next head is not timed while it waits for an answer."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self.head_timer is not None:  # (the common case returns here: no timer was armed)
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        if self.in_head and not self.transport.is_closing():
            if self.head_bytes:
                self._refuse(408, b"request header not received in time (gateway.header-timeout)")
            else:
                self.transport.close()  # nothing sent at all: nothing to answer

    def _refuse(self, status: int, message: bytes) -> None:
        """Answer and close without involving the app: the head never completed, so there is no request."""
        self._disarm()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(message), message))
        self.transport.close()
        self.in_head = False


def protocol(limits: HeadLimits) -> Any:
    """What `uvicorn.run(http=...)` takes: a picklable factory (workers are spawned processes)."""
    return functools.partial(GuardedHttpTools, limits=limits)


__all__ = ["GuardedHttpTools", "HeadLimits", "protocol"]
