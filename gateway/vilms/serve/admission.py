"""Admission control: a concurrency cap with a bounded wait queue per backend, and a budget for body bytes.

Why: one upstream pool served every engine, so slow streams to one model starved another on a different
host ("503 unreachable"). Each backend (an engine service: its URL list) now has its own slots; callers
beyond them wait in a short queue, and beyond that get 429 with Retry-After, never a connect failure.
Everything here runs on the event loop only, so plain counters need no locks.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections import deque

from vilms.errors import GatewayError
from vilms.serve.observe import BODY_BYTES
from vilms.serve.security import RateLimited


class BackendLimiter:
    """At most `limit` requests in flight to one backend; beyond, each caller (API key; anonymous callers are one)
    may queue up to `queue` requests for at most `timeout` seconds, and freed slots go round-robin between the
    callers' queues, to the waiting caller holding the fewest slots (ties: whose turn it is).

    Why per caller: with one shared FIFO queue, a key holding every slot and the queue made another key's first
    request a 429 (issue #21: 390 streams of one key); now that request queues in its own line and takes the
    next free slot before the busy key's next one.
    """

    def __init__(self, name: str, limit: int, queue: int, timeout: float):
        self.name, self.limit, self.queue, self.timeout = name, limit, queue, timeout
        self.active = 0
        self.waiting = 0
        self.queues: dict[str, deque[asyncio.Future[None]]] = {}  # insertion order = whose turn is next
        self.held: dict[str, int] = {}

    async def acquire(self, owner: str = "") -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            self.held[owner] = self.held.get(owner, 0) + 1
            return
        line = self.queues.get(owner)
        if line is not None and len(line) >= self.queue or self.queue == 0:
            raise RateLimited(f"model backend {self.name!r} is at capacity ({self.limit} in flight, "
                              f"{self.queue} of this caller's requests waiting); retry shortly", retry_after=1,
                              code="backend_at_capacity")
        waiter = asyncio.get_running_loop().create_future()
        self.queues.setdefault(owner, deque()).append(waiter)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(owner)  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._forget(owner, waiter)
            if isinstance(exc, TimeoutError):
                raise RateLimited(f"model backend {self.name!r} stayed at capacity for {self.timeout:g}s; retry "
                                  "shortly", retry_after=1, code="backend_at_capacity") from None
            raise

    def _forget(self, owner: str, waiter: asyncio.Future[None]) -> None:
        line = self.queues.get(owner)
        if line is None:
            return
        try:
            line.remove(waiter)
            self.waiting -= 1
        except ValueError:
            return
        if not line:
            del self.queues[owner]

    def release(self, owner: str = "") -> None:
        """`owner` is done with a slot: hand it to the next waiter (fewest slots held, then round-robin), else free it."""
        left = self.held.get(owner, 0) - 1
        if left > 0:
            self.held[owner] = left
        else:
            self.held.pop(owner, None)
        if owner in self.queues:  # the caller that just had a turn goes to the back of the round
            self.queues[owner] = self.queues.pop(owner)
        while self.queues:
            turn = min(self.queues, key=lambda o: self.held.get(o, 0))  # first in the round among the least served
            line = self.queues.pop(turn)
            waiter = line.popleft()
            self.waiting -= 1
            if line:
                self.queues[turn] = line  # to the back of the round
            if not waiter.done():
                self.held[turn] = self.held.get(turn, 0) + 1
                waiter.set_result(None)
                return
        self.active -= 1


class FairGate(BackendLimiter):
    """`limit` holders at once, everyone else waits (no queue bound, no timeout: the caller's own deadlines apply),
    and a freed place goes to the waiting caller holding the fewest, round-robin: the image decode pool and the
    image fetch pool are shared this way, so one key's 64 large images cannot make another key's one small image
    wait behind all of them (issue #21: 25.8 s for an 8x8 PNG)."""

    def __init__(self, name: str, limit: int):
        super().__init__(name, limit, queue=sys.maxsize, timeout=None)  # type: ignore[arg-type]


class BodyBudget:
    """Bytes of request bodies held by the gateway at once, charged as they arrive: over the gateway-wide
    limit -> 503, over one owner's share (an API key; anonymous callers share one) -> 429, both with Retry-After.

    Why as they arrive: reserving a declared Content-Length up front let four trickling 64 MiB uploads hold the
    whole budget while sending a byte every few seconds (issue #21); now a caller holds only what it sent.
    """

    def __init__(self, limit: int, per_owner: int | None = None):
        self.limit = limit
        self.per_owner = per_owner if per_owner is not None else limit
        self.used = 0
        self.owners: dict[str, int] = {}
        _BUDGETS.add(self)

    def hold(self, owner: str) -> "BodyHold":
        return BodyHold(self, owner)

    def take(self, size: int, owner: str = "") -> None:
        if self.used + size > self.limit:
            raise Overloaded(f"the gateway is holding {self.limit} bytes of request bodies already; retry shortly")
        mine = self.owners.get(owner, 0) + size
        if mine > self.per_owner:
            raise RateLimited(f"this caller is sending {self.per_owner} bytes of request bodies at once already "
                              "(gateway.max-key-body-bytes); retry shortly", code="body_share_exceeded")
        self.owners[owner] = mine
        self.used += size

    def give(self, size: int, owner: str = "") -> None:
        if size:
            self.used -= size
            left = self.owners.get(owner, 0) - size
            if left > 0:
                self.owners[owner] = left
            else:
                self.owners.pop(owner, None)


_BUDGETS: "weakref.WeakSet[BodyBudget]" = weakref.WeakSet()


def _held() -> float:
    """vilms:request_body_bytes_held, read when /metrics is scraped: what every live budget holds (a gateway has one;
    a test process may run several). Setting the gauge on every take and give cost two locks per request."""
    return float(sum(budget.used for budget in list(_BUDGETS)))


BODY_BYTES.set_function(_held)


class BodyHold:
    """One request's bytes in the budget: taken chunk by chunk, given back once (release is idempotent)."""

    __slots__ = ("budget", "owner", "held")

    def __init__(self, budget: BodyBudget, owner: str):
        self.budget, self.owner, self.held = budget, owner, 0

    def take(self, size: int) -> None:
        self.budget.take(size, self.owner)
        self.held += size

    def release(self) -> None:
        self.budget.give(self.held, self.owner)
        self.held = 0


class Overloaded(GatewayError):
    status = 503
    type = "server_overloaded"

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")
        self.retry_after = 1
