"""A large body as the gateway holds it after parsing (`Large`), the one thread that works on such bodies
(`Bodies`), and its serialisation for the engine in short calls, sent as pieces (`forwarded`). The parsing side is
vilms.serve.api.bodies; this module is apart so that engine adapters can use it without importing the API.

Why short calls: orjson.dumps holds the GIL for a whole call, 45-50 ms for a forwarded 64 MiB body, on the event
loop where the engine adapter ran it; from a worker thread it stalls the loop as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import orjson

PIECE = 1 << 18  # bytes of JSON one orjson.dumps call makes (about: sized from the previous call's output)
MAX_RUN = 1024  # list elements per orjson.dumps call at most (sized by bytes below that)
LONG_LIST = 256  # an element holding a list longer than this is serialised apart, in runs of its own
RUN = 64  # list elements freed per call by `discard` (a chat message of ten 1 KiB parts: ~10 µs each)
T = TypeVar("T")


class Large(dict):
    """A body that took the large road. `many`: it holds more than MANY values, so its request model is validated
    off the loop too (`Bodies.run`). `texts`: message texts (and plain image URLs) kept as the client's own JSON
    string literals, never made Python strings (placeholder -> (opening, closing) quote positions in `raw`): the body holds a short
    placeholder string there (which passes the `str` those fields are), and `serialised` puts the literal back."""

    many: bool = False
    raw: bytes = b""
    nonce: str = ""
    texts: dict[str, tuple[int, int]] = {}

    images: frozenset[str] = frozenset()  # the placeholders in `texts` that are image URLs

    def images_used(self) -> None:
        """The kept image URL literals were decoded (their parts now hold prepared images): forgotten, so that
        nothing makes them strings later (Ollama's adapter: 44 MiB for three images) and the received body is
        freed (in this thread's pool) once no message text needs it."""
        for place in self.images:
            self.texts.pop(place, None)
        self.images = frozenset()
        if not self.texts and self.raw:
            held, self.raw = [self.raw], b""
            Bodies.executor.submit(held.clear)

    def literal(self, value: Any) -> memoryview | None:
        """The content of the kept literal `value` stands for (a view of the received body), None if it is not a
        placeholder. Chat image URLs are kept too when plain ASCII (vilms.serve.api.bodies.image_urls)."""
        span = self.texts.get(value) if isinstance(value, str) else None
        return None if span is None else memoryview(self.raw)[span[0] + 1:span[1]]


class Bodies:
    """The one thread that parses, validates and serialises large bodies (module-wide: every app in a process
    shares it)."""

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vilms-body")

    @classmethod
    async def run(cls, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(cls.executor, fn, *args)

    @classmethod
    async def run_uncollected(cls, fn: Callable[..., T], *args: Any) -> T:
        """`run` for a step that makes ~100,000 objects (validating a body of many values): see `uncollected`."""
        return await asyncio.get_running_loop().run_in_executor(cls.executor, _uncollected, fn, *args)


@contextlib.contextmanager
def uncollected() -> Iterator[None]:
    """The cyclic collector paused while a body thread step makes many objects, and what it made frozen after
    (gc.freeze: never walked, still freed when unreferenced). Why: a 64 MiB body of ~200,000 values makes ~150,000
    containers (and validation as many models); any collection among them walked them all in one piece, 58-103 ms
    of GIL mid-parse, and without the freeze the young and full collections that met them later stalled the loop
    80-360 ms (bench/bigbodies.py). For steps that make few objects (images, long texts) it is not used.

    A freeze takes every object of the moment, so garbage the collector has not freed yet would be kept for good:
    a full collection runs first, over what is not frozen yet (what came since the last freeze: milliseconds).
    Requests make no reference cycles (vilms.serve.heap), so what the loop makes meanwhile is freed by its count."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _uncollected(fn: Callable[..., T], *args: Any) -> T:
    with uncollected():
        return fn(*args)


def discard(*holders: Any) -> None:
    """Empty the long lists these hold (a body's members, a model's fields) in the body thread, RUN elements per
    call. Why: the last reference to a parsed 64 MiB body of ~200,000 values (or to its validated model) dropped
    on the event loop frees it all in one C call there, 50-60 ms each; the caller must not read them after."""
    lists: list[Any] = [value for holder in holders
                        for value in (holder if isinstance(holder, dict) else vars(holder)).values()
                        if isinstance(value, list) and len(value) > RUN]
    for holder in holders:  # the received body kept for its literal texts: 64 MiB freed there too (4-9 ms here)
        if type(holder) is Large and holder.raw:
            lists.append([holder.raw])
            holder.raw = b""
    if lists:
        Bodies.executor.submit(_emptied, lists)


def _emptied(lists: list[list[Any]]) -> None:
    for items in lists:
        while items:
            del items[-RUN:]


async def forwarded(body: dict[str, Any]) -> bytes | list[bytes | memoryview]:
    """The body as JSON for the engine: orjson on the loop for a usual body; a large one in the body thread, in
    short calls, and sent as the pieces it was made of (`serialised`), one transport write each: never joined into
    one 64 MiB buffer on the event loop (vilms.serve.upstream writes the head, then the pieces)."""
    if type(body) is not Large:
        return orjson.dumps(body)
    return await Bodies.run(serialised, body)


def serialised(body: Large) -> list[bytes | memoryview]:
    """orjson.dumps(body) as pieces: every list in runs of elements of about PIECE bytes (an element that holds a
    long list of its own, such as one message of 17,000 parts, serialised apart, the same way), each kept text the
    client's literal itself (a view of the body it came in: never copied)."""
    pieces: list[bytes | memoryview] = []
    _dict_pieces(body, pieces)
    pieces = [piece for piece in pieces if piece]
    return _spliced(pieces, body) if body.texts else pieces


def _value_pieces(value: Any, pieces: list[bytes | memoryview]) -> None:
    if isinstance(value, list) and value:
        _list_pieces(value, pieces)
    elif _holds_long_list(value):
        _dict_pieces(value, pieces)
    else:
        pieces.append(orjson.dumps(value))


def _dict_pieces(mapping: dict[str, Any], pieces: list[bytes | memoryview]) -> None:
    pieces.append(b"{")
    for i, (key, value) in enumerate(mapping.items()):
        pieces += [b"," if i else b"", orjson.dumps(key), b":"]
        _value_pieces(value, pieces)
    pieces.append(b"}")


def _holds_long_list(value: Any) -> bool:
    """A list of more than LONG_LIST elements, or an object with one among its members: serialised in runs."""
    if isinstance(value, list):
        return len(value) > LONG_LIST
    return isinstance(value, dict) and any(isinstance(v, list) and len(v) > LONG_LIST for v in value.values())


def _list_pieces(items: list[Any], pieces: list[bytes | memoryview]) -> None:
    """A list's JSON in orjson calls over runs of elements sized from the bytes the previous run made, at most
    MAX_RUN elements (a run of tiny elements must not grow into one call over the large ones after them)."""
    pieces.append(b"[")
    at, run, n = 0, 16, len(items)
    while at < n:
        end = min(at + run, n)
        nested = next((j for j in range(at, end) if _holds_long_list(items[j])), end)
        if nested == at:  # this element apart, in runs of its own
            pieces.append(b"," if at else b"")
            _value_pieces(items[at], pieces)
            at += 1
            continue
        part = orjson.dumps(items[at:nested])
        pieces += [b"," if at else b"", part[1:-1]]
        run = max(1, min(4 * run, MAX_RUN, (nested - at) * PIECE // len(part)))
        at = nested
    pieces.append(b"]")


def _spliced(pieces: list[bytes | memoryview], body: Large) -> list[bytes | memoryview]:
    """`pieces` with every kept text's placeholder literal replaced by the client's literal."""
    found = re.compile(rb'"\\u001fvilms:(\d+):' + body.nonce.encode() + rb'"')
    raw, out = memoryview(body.raw), []
    for piece in pieces:
        cut = found.split(piece)
        out.append(cut[0])
        for index, rest in zip(cut[1::2], cut[2::2]):
            opening, closing = body.texts[f"\x1fvilms:{int(index)}:{body.nonce}"]
            out += [raw[opening:closing + 1], rest]
    return [piece for piece in out if len(piece)]
