"""Admission control: a concurrency cap with a bounded wait queue per backend, and a budget for body bytes.

Why: one upstream pool served every engine, so slow streams to one model starved another on a different
host ("503 unreachable"). Each backend (an engine service: its URL list) now has its own slots; callers
beyond them wait in a short queue, and beyond that get 429 with Retry-After, never a connect failure.
Everything here runs on the event loop only, so plain counters need no locks.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import GatewayError
from .observe import BODY_BYTES
from .security import RateLimited


class BackendLimiter:
    """At most `limit` requests in flight to one backend; up to `queue` more wait at most `timeout` seconds."""

    def __init__(self, name: str, limit: int, queue: int, timeout: float):
        self.name, self.limit, self.queue, self.timeout = name, limit, queue, timeout
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.queue:
            raise RateLimited(f"model backend {self.name!r} is at capacity ({self.limit} in flight, "
                              f"{self.queue} waiting); retry shortly", retry_after=1, code="backend_at_capacity")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise RateLimited(f"model backend {self.name!r} stayed at capacity for {self.timeout:g}s; retry "
                                  "shortly", retry_after=1, code="backend_at_capacity") from None
            raise

    def release(self) -> None:
        """Hand the slot to the first live waiter, else free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class BodyBudget:
    """Bytes of request bodies held by the gateway at once; over budget -> 503 with Retry-After."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise Overloaded(f"the gateway is holding {self.limit} bytes of request bodies already; retry shortly")
        self.used += size
        BODY_BYTES.set(self.used)

    def give(self, size: int) -> None:
        if size:
            self.used -= size
            BODY_BYTES.set(self.used)


class Overloaded(GatewayError):
    status = 503
    type = "server_overloaded"

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")
        self.retry_after = 1
