"""A client that leaves before its reply is complete: its request's work is cancelled (the engine call closed, 499).

ASGI says so only through `receive()`, so every request ran a second task parked on it for its whole life: created,
stepped, cancelled and stepped again, ~4% of a proxied chat's gateway CPU (cProfile, c=64). Under `vilms serve` the
protocol (vilms.serve.server) tells the request directly instead: each request's scope carries a `Departure` in
`scope["extensions"]`, fired when the connection is lost while its reply is incomplete. Under any other ASGI server
(the tests' h11 servers) the task parked on `receive()` remains.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

EXTENSION = "vilms.departure"


class Departure:
    """The callbacks to run if this request's client goes; one that comes after it went runs at once."""

    __slots__ = ("callbacks", "gone")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.gone = False

    def add(self, callback: Callable[[], None]) -> None:
        if self.gone:
            callback()
        else:
            self.callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        if callback in self.callbacks:
            self.callbacks.remove(callback)

    def fire(self) -> None:
        """Called by the protocol when the connection is lost before the reply was complete."""
        self.gone = True
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


class LeaveWatch:
    """Cancels the task that made it if the client goes before `stop()`; `gone` then says that is why."""

    __slots__ = ("task", "gone", "departure", "watcher")

    def __init__(self, scope: dict[str, Any], receive: Callable[[], Any]):
        task = asyncio.current_task()
        assert task is not None
        self.task, self.gone, self.watcher = task, False, None
        self.departure: Departure | None = (scope.get("extensions") or {}).get(EXTENSION)
        if self.departure is not None:
            self.departure.add(self.leave)
        else:
            self.watcher = asyncio.get_running_loop().create_task(self.watch(receive))

    def leave(self) -> None:
        self.gone = True
        self.task.cancel()

    async def watch(self, receive: Callable[[], Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.leave()

    def stop(self) -> None:
        if self.departure is not None:
            self.departure.discard(self.leave)
        elif self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None  # (its cancellation's traceback holds this watch: no cycle through the task)


__all__ = ["Departure", "EXTENSION", "LeaveWatch"]
