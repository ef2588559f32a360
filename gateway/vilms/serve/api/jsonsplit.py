"""A JSON text parsed in short calls: the same value `orjson.loads` returns, built from many orjson calls over runs
of whole elements (or members) of at most PIECE bytes each, so that no call holds the GIL long.

Why: orjson holds the GIL for a whole call, and a 64 MiB body of ~200,000 short values (nothing long enough to lift
out, vilms.serve.api.bodies) takes it 110-390 ms; from the body thread that stalls the event loop as long.

How the runs are found: in an array of objects (chat messages, tools), a guess first: the last comma in the
window's second half that the bytes the array's first element began with (`{"role"`) follow, found by bytes.rfind.
Otherwise, or once a guess failed to parse, one regular expression (`_RUN`, possessive, so sre never backtracks)
matches as many complete "value ," units as fit in a window, strings and containers nested up to NEST levels
included; sre walks string content at ~150 MB/s, and Python runs once per window, not per value. A value that does
not fit (bigger than a window, or nested deeper) is a container split the same way, one level down.

Why the result is exact: a run is handed to orjson as `[run]` (or `{run}`); the text is the concatenation of the runs
and their separators, and JSON's grammar is unambiguous, so when every run parses, the whole text is valid and its
value is the runs' values put together (keys: later duplicates win, in first-seen order, as in orjson), however the
cuts were found. A guessed run that fails is dropped for the exact runs; an exact run that fails means the text is
invalid (its cuts are real element boundaries: strings are matched exactly), and orjson's error is the answer.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

PIECE = 1 << 18  # bytes of text per orjson call (~0.5-2 ms)
NEST = 4  # container levels one run may hold inside an element (a chat message with parts: 3)
MAX_DEPTH = 128  # levels this splitter follows (the gateway refuses deeper bodies anyway)

_WS = rb"[ \t\n\r]*+"
_STR = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_SCALAR = rb'[-+.0-9A-Za-z]++'


def _nested(levels: int) -> bytes:
    """A container (brackets not paired by kind: orjson checks that) with at most `levels` levels of nesting."""
    inner = rb'(?:[^"\[\]{}]++|' + _STR + rb')*+'
    pattern = rb'[\[{]' + inner + rb'[\]}]'
    for _ in range(levels - 1):
        inner = rb'(?:[^"\[\]{}]++|' + _STR + rb'|' + pattern + rb')*+'
        pattern = rb'[\[{]' + inner + rb'[\]}]'
    return pattern


_VALUE = rb'(?:' + _STR + rb'|' + _nested(NEST) + rb'|' + _SCALAR + rb')'
_ITEM = _WS + _VALUE + _WS
_MEMBER = _WS + _STR + _WS + rb':' + _ITEM
_RUN = {b"[": re.compile(rb'(?:' + _ITEM + rb',)*+'), b"{": re.compile(rb'(?:' + _MEMBER + rb',)*+')}
_LAST = {b"[": re.compile(_ITEM + rb'\]'), b"{": re.compile(_MEMBER + rb'\}')}
_KEY = re.compile(_WS + rb'(' + _STR + rb')' + _WS + rb':' + _WS)
_SPACE = re.compile(_WS)
_HEAD = re.compile(rb'\{' + _WS + _STR)  # an array's first element, if an object: its opening and first key
_SCALAR_AT = re.compile(rb'(?:' + _STR + rb'|' + _SCALAR + rb')')


class Invalid(ValueError):
    """The text is not valid JSON (or nests deeper than MAX_DEPTH): msg and pos as orjson's errors have them."""

    def __init__(self, msg: str, pos: int):
        super().__init__(f"{msg} at position {pos}")
        self.msg, self.pos = msg, pos


def loads(text: bytes) -> Any:
    """The value of the JSON text, as orjson.loads gives it, in calls over at most ~PIECE bytes each."""
    start = _SPACE.match(text).end()
    if start == len(text) or text[start:start + 1] not in (b"[", b"{"):
        return _orjson(text, 0)
    value, end = _container(text, start, 1)
    if _SPACE.match(text, end).end() != len(text):
        raise Invalid("trailing characters", end)
    return value


def _orjson(piece: bytes, offset: int) -> Any:
    try:
        return orjson.loads(piece)
    except orjson.JSONDecodeError as exc:
        raise Invalid(exc.msg, offset + exc.pos) from None


def _container(text: bytes, at: int, depth: int) -> tuple[Any, int]:
    """The array or object opening at `at`, and the position after it: runs of whole elements in one orjson call
    each, a too-big or too-deep element split one level down."""
    if depth > MAX_DEPTH:
        raise Invalid(f"nested deeper than {MAX_DEPTH} levels", at)
    kind = bytes(text[at:at + 1])  # a bytearray body (api.requests.read_body) slices to bytearray: unhashable
    close = b"]" if kind == b"[" else b"}"
    value: Any = [] if kind == b"[" else {}
    add = value.extend if kind == b"[" else value.update
    run, last, n, pos = _RUN[kind], _LAST[kind], len(text), at + 1
    gap = _SPACE.match(text, pos).end()
    if text[gap:gap + 1] == close:  # [] or {}
        return value, gap + 1
    head = _HEAD.match(text, gap) if kind == b"[" else None
    while True:
        if head and n - pos > PIECE:
            cut = _guess(text, pos, head.group())
            if cut > pos:
                try:
                    value.extend(orjson.loads(b"[" + text[pos:cut] + b"]"))
                    pos = cut + 1
                    continue
                except orjson.JSONDecodeError:
                    head = None  # a wrong guess (or an invalid text): the exact runs from here on
        window = min(n, pos + PIECE)
        end = run.match(text, pos, window).end()
        if end > pos:  # whole "element," units: one call
            add(_orjson(kind + text[pos:end - 1] + close, pos - 1))
        final = last.match(text, end, window)
        if final:
            add(_orjson(kind + text[end:final.end()], end - 1))
            return value, final.end()
        if end > pos:
            pos = end
            continue  # the window ended: next run
        pos = _one(text, pos, depth, kind, value)  # an element too big or too deep for a run: split it
        gap = _SPACE.match(text, pos).end()
        if text[gap:gap + 1] == close:
            return value, gap + 1
        if text[gap:gap + 1] != b",":
            raise Invalid("expected ',' or '%s'" % close.decode(), gap)
        pos = gap + 1


def _guess(text: bytes, pos: int, head: bytes) -> int:
    """A comma that likely ends a run of whole elements, found at memchr speed: the last one in the second half of
    the window that precedes the bytes the array's first element began with (a chat message's `{"role"`); -1 if
    none. Only a guess: the run is taken only if orjson parses it (see the module docstring)."""
    at = text.rfind(head, pos + PIECE // 2, pos + PIECE)
    if at < 0:
        return -1
    cut = at - 1
    while cut > pos and text[cut] in b" \t\n\r":
        cut -= 1
    return cut if text[cut] == 0x2C else -1


def _one(text: bytes, pos: int, depth: int, kind: bytes, value: Any) -> int:
    """Parse the one element at `pos` that no run took (a container split one level down, or a scalar longer
    than a window, alone); returns the position after it."""
    key = None
    if kind == b"{":
        found = _KEY.match(text, pos)
        if found is None:
            raise Invalid("expected a string key and ':'", _SPACE.match(text, pos).end())
        key, pos = _orjson(found.group(1), found.start(1)), found.end()
    else:
        pos = _SPACE.match(text, pos).end()
    if text[pos:pos + 1] in (b"[", b"{"):
        child, pos = _container(text, pos, depth + 1)
    else:
        found = _SCALAR_AT.match(text, pos)
        if found is None:
            raise Invalid("expected a value", pos)
        child, pos = _orjson(text[pos:found.end()], pos), found.end()
    if key is None:
        value.append(child)
    else:
        value[key] = child
    return pos
