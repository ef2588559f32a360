"""A reply with a Content-Length written in one send: its head held until its body comes.

Why: uvicorn writes a response's head when the app starts it and the body when the app sends it, so every JSON
answer cost two send() calls, two TCP segments and two wake-ups of the client (strace on the gateway: 164 bytes
of head, then 327 of a proxied chat's body). The head of such a reply is held here and written with the first body
bytes (one writev). What the client sees first then is the whole answer, which nothing waits on between the two:
starlette's Response sends both at once. A reply without body bytes (HEAD, Content-Length 0) and a chunked one (a
stream, whose head the client should see before the first token) are written as they come.
"""

from __future__ import annotations

import weakref
from typing import Any


class OneSendTransport:
    """The transport as one request's uvicorn cycle sees it (`cycle.transport`); everything but `write` and `close`
    goes straight to the connection's transport. The cycle is held weakly: a cycle and its transport holding each
    other would be a reference cycle per request, left to the garbage collector (serve/heap.py)."""

    __slots__ = ("transport", "cycle", "head", "seen_head")

    def __init__(self, transport: Any, cycle: Any):
        self.transport, self.cycle = transport, weakref.ref(cycle)
        self.head: bytes | None = None
        self.seen_head = cycle.response_started  # (already started: its head is out, nothing is held)

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.writelines((head, data))
            return
        if not self.seen_head:
            cycle = self.cycle()
            if cycle is not None and cycle.response_started:  # the cycle writes its head first (uvicorn's send)
                self.seen_head = True
                if _sized_with_body(cycle):
                    self.head = data
                    return
        self.transport.write(data)

    def close(self) -> None:
        self.head = None  # an app that failed between head and body: the client sees the close (before: a head too)
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _sized_with_body(cycle: Any) -> bool:
    return cycle.chunked_encoding is False and cycle.expected_content_length > 0 and cycle.scope["method"] != "HEAD"


__all__ = ["OneSendTransport"]
