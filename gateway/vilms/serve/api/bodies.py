"""The large-body road: a body of a mebibyte or more (or of many JSON values) is parsed off the event loop, in calls
that stay short (the loop then waits milliseconds for the GIL, not the whole parse).

Why in pieces and not just in a thread: orjson, pydantic-core and binascii hold the GIL for a whole call, so one
orjson.loads of a 64 MiB body (90-390 ms on the 2-core VM) stalls the loop as long from a worker thread as on the
loop itself. So the parser first lifts every long string literal (image data URLs, huge texts) out of the body,
parses the skeleton left in runs of whole elements (vilms.serve.api.jsonsplit: a body of ~200,000 short values is
~250 orjson calls), and turns each long string into its value in windows of WINDOW bytes, one short orjson call
each. A chat message's text is only checked that way, never made a Python string: the body keeps a placeholder
there and the client's literal is put back when the body is forwarded (vilms.serve.large: a 64 MiB text with CJK
was one ~90 MB join, 84-107 ms of GIL); a chat image's plain-ASCII data URL is kept the same way and decoded from
the received body by vilms.serve.media. One thread does this for every large body (`Bodies`): one more GIL holder,
never one per request.

Finding the long strings without tokenising the whole body: it is cut into stretches of LONG // 2 bytes; a stretch
whose every `"` is escaped (as many `"` as `\\"`) and that holds a byte JSON allows only inside strings (a letter
other than those of true, false, null, e/E) lies inside a string when the body is valid JSON: outside strings
there are no backslashes, so the `"` opening that string would be unescaped. From such a stretch the string's own
quotes are found by local backslash counting; strings are never nested, so each byte is looked at a bounded number
of times, at memchr or sre speed. An invalid body may be lifted wrongly; then the skeleton is invalid too (every
placeholder starts with a backslash, which is invalid outside a string) and the answer is the same 400.
A stretch with no such byte but none of `[]{},:` either (a long text of plain letters, digits and spaces) is taken
for the inside of a string too: outside strings it could only be one token or whitespace run of LONG // 2 bytes or
more, which no client sends; such a body is refused (400) rather than parsed in one long call (review: a 63 MiB
text of "aaaa…" was one 335 ms regex and orjson call, 63 MiB of spaces between two keys 101 ms).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from typing import Any, Callable, Iterator

import numpy
import orjson

from vilms.errors import BadRequest
from vilms.serve.api import jsonsplit
from vilms.serve.large import Bodies, Large, uncollected

LARGE = 1 << 20  # bodies from this size on take this road (below it: the loop, as before; ~200 B chats pay nothing)
MANY = 10_000  # ... and bodies holding more JSON values than this, whatever their size (validation is per value)
LONG = 1 << 18  # strings of at least this many bytes are lifted out of the skeleton (shorter ones may be too)
WINDOW = 1 << 19  # bytes of a long string turned into text per orjson call (~1-3 ms)
STEP = 1 << 18  # bytes a string's end is looked for per call (sre steps over escapes at ~50 MB/s: ~5 ms)
SWITCH_INTERVAL = 0.001  # s: a worker running Python hands the GIL to a waiting loop within this (CPython: 0.005)
COUNTED = 1 << 20  # bytes per count() call of the pre-parse value count
_INSIDE_ONLY = re.compile(rb"[^\t\n\r 0-9+\-.eEtrufalsn\[\]{},:]")  # a byte valid JSON has only inside strings
_STRUCTURAL = re.compile(rb"[\[\]{},:]")  # outside strings, every value but one huge token is delimited by these
_CONTENT = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # string content: plain bytes and escapes
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


def large(raw: bytes) -> bool:
    """Whether a body takes this road: by size, or (cheaply counted, for bodies over MANY bytes only) by values."""
    return len(raw) >= LARGE or (len(raw) > MANY and json_nodes(raw, 0, len(raw)) > MANY)


def json_nodes(raw: bytes, start: int, end: int) -> int:
    """An upper bound on the values raw[start:end] holds (every value after an array's or object's first is
    preceded by a comma), counted at memchr speed. Base64 image data holds none of these bytes."""
    return raw.count(b",", start, end) + raw.count(b"{", start, end) + raw.count(b"[", start, end)


def parse_large(raw: bytes, max_nodes: int | None, loads: Callable[..., dict[str, Any]],
                texts: bool = False) -> Large:
    """The body as `loads` (the small-body parser, with its checks) would return it, parsed in short calls: long
    strings lifted out first, the value count taken on what is left, then the skeleton parsed in pieces
    (vilms.serve.api.jsonsplit) and the strings put back. With `texts` (chat), long message texts stay the client's
    literals (checked, not decoded: see `Large`). Runs in the body thread."""
    spans = long_strings(raw)
    nonce = secrets.token_hex(8)
    skeleton = lifted(raw, spans, nonce)
    steps = range(0, len(skeleton), COUNTED)
    openings = sum(skeleton.count(b"{", i, i + COUNTED) + skeleton.count(b"[", i, i + COUNTED) for i in steps)
    nodes = openings + sum(skeleton.count(b",", i, i + COUNTED) for i in steps)  # as json_nodes counts
    if max_nodes is not None and nodes > max_nodes:
        raise BadRequest(f"request body holds more than {max_nodes} JSON values (gateway.max-json-nodes)",
                         code="too_many_json_values")
    with uncollected() if nodes > MANY else contextlib.nullcontext():
        body = Large(loads(skeleton, jsonsplit.loads, openings))
    body.many, body.nonce = nodes > MANY, nonce
    if spans:
        places = {f"\x1fvilms:{i}:{nonce}": span for i, span in enumerate(spans)}
        kept = message_texts(body, places) if texts else set()
        for place in kept:
            opening, closing = places[place]
            for _ in _decoded(raw, opening + 1, closing):  # checked as orjson would, then dropped
                pass
        images = {place for place in image_urls(body, places) if plain(raw, places[place][0] + 1, places[place][1])}
        kept |= images
        body.images = frozenset(images)
        if kept:
            body.raw, body.texts = raw, {place: places[place] for place in kept}
        put_back(body, {place: string_value(raw, o + 1, c) for place, (o, c) in places.items() if place not in kept})
    return body


def image_urls(body: dict[str, Any], places: dict[str, tuple[int, int]]) -> set[str]:
    """The placeholders that stand for a chat message part's image URL (a base64 data URL: ~20 MiB). They are kept
    as literals when plain (`plain`): vilms.serve.media decodes the base64 straight from the received body
    (`Large.literal`), so the 20 MiB never become a Python string (bench/bigbodies.py, images: that string and
    its copies were most of the GIL the body thread held)."""
    kept: set[str] = set()
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            value = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
            url = value.get("url") if isinstance(value, dict) else value
            if isinstance(url, str) and url in places:
                kept.add(url)
    return kept


def plain(raw: bytes, start: int, end: int) -> bool:
    """Whether raw[start:end], a string literal's content, is printable ASCII with no backslash: then its text is
    its bytes, and it is valid JSON (no escape to check, no control character). At memchr speed, and by numpy
    with the GIL released (min and max over 20 MiB: ~3.5 ms)."""
    if raw.find(b"\\", start, end) >= 0:
        return False
    if end == start:
        return True
    values = numpy.frombuffer(raw, numpy.uint8, end - start, start)
    return bool(values.min() >= 0x20 and values.max() < 0x80)


def message_texts(body: dict[str, Any], places: dict[str, tuple[int, int]]) -> set[str]:
    """The placeholders that stand for a chat message's text: `messages[i].content` as a string, or the `text` of a
    part whose type is "text". Nothing else in the gateway reads those (the models only check they are strings)."""
    kept: set[str] = set()
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content in places:
            kept.add(content)
        for part in content if isinstance(content, list) else ():
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if isinstance(text, str) and text in places:
                kept.add(text)
    return kept


def materialise(body: dict[str, Any]) -> dict[str, Any]:
    """The kept message texts made strings (for an engine adapter that reads them: Ollama's). Body thread."""
    if type(body) is Large and body.texts:
        put_back(body, {place: string_value(body.raw, o + 1, c) for place, (o, c) in body.texts.items()})
        body.texts = {}
    return body


async def whole(body: dict[str, Any]) -> dict[str, Any]:
    """The body with every kept message text a string (`materialise`, in the body thread when there are any)."""
    if type(body) is Large and body.texts:
        return await Bodies.run(materialise, body)
    return body


def lifted(raw: bytes, spans: list[tuple[int, int]], nonce: str) -> bytes:
    """`raw` with each span (a string literal, quotes included) replaced by a short placeholder literal."""
    if not spans:
        return raw
    pieces, last = [], 0
    for i, (opening, closing) in enumerate(spans):
        pieces += [raw[last:opening], b'"\\u001fvilms:%d:%s"' % (i, nonce.encode())]
        last = closing + 1
    pieces.append(raw[last:])
    return b"".join(pieces)


def long_strings(raw: bytes) -> list[tuple[int, int]]:
    """(opening, closing) quote positions of string literals found by the stretch test in the module docstring: every
    string of at least LONG bytes, in order, never overlapping."""
    spans: list[tuple[int, int]] = []
    half, k, n = LONG // 2, 0, len(raw)
    while k + half <= n:
        end = k + half
        if raw.count(b'"', k, end) != raw.count(b'\\"', k, end) or not (
                _INSIDE_ONLY.search(raw, k, end) or not _STRUCTURAL.search(raw, k, end)):
            k = end
            continue
        opening = _opening_quote(raw, k)
        closing = _closing_quote(raw, opening + 1) if opening >= 0 else -1
        if closing < k or (spans and opening <= spans[-1][1]):
            raise BadRequest("request body is not valid JSON: a string is not terminated", code="invalid_json")
        spans.append((opening, closing))
        k = closing + 1
    return spans


def _escaped(raw: bytes, at: int) -> bool:
    """Whether the byte at `at` follows an odd run of backslashes (inside a string: it is escaped)."""
    run, end = 0, at
    while end > 0:
        chunk = raw[max(0, end - 256):end]
        stripped = chunk.rstrip(b"\\")
        run += len(chunk) - len(stripped)
        if stripped:
            break
        end -= len(chunk)
    return run % 2 == 1


def _opening_quote(raw: bytes, inside: int) -> int:
    """The last unescaped `"` before `inside` (a position known to lie in a string): that string's opening quote."""
    at = inside
    while (at := raw.rfind(b'"', 0, at)) >= 0 and _escaped(raw, at):
        pass
    return at


def _closing_quote(raw: bytes, at: int) -> int:
    """The first unescaped `"` from `at` (where a string's content or one of its escapes begins), -1 if none.
    A step at a time: stretches without backslashes, and stretches whose every `"` follows exactly one backslash
    (prose with quotes in it), are skipped at memchr speed; only the rest is stepped over by sre (~50 MB/s)."""
    n = len(raw)
    while at < n:
        end = min(at + STEP, n)
        quote = raw.find(b'"', at, end)
        if raw.find(b"\\", at, end if quote < 0 else quote) < 0:
            if quote >= 0:
                return quote
            at = end
        elif raw.count(b'"', at, end) == raw.count(b'\\"', at, end) and raw.find(b'\\\\"', at, end) < 0:
            at = end - 1 if end < n and _escaped(raw, end) else end  # never between a backslash and what it escapes
        else:
            stop = _CONTENT.match(raw, at, end).end()  # up to an unescaped quote, or an escape cut by the window
            if stop < end and raw[stop] == 0x22:
                return stop
            if stop == at and end == n:
                return -1  # a backslash ends the body
            at = stop
    return -1


def string_value(raw: bytes, start: int, end: int) -> str:
    """The text of the string literal whose content is raw[start:end], checked and unescaped as orjson does, in
    windows of WINDOW bytes cut where no escape, surrogate pair or UTF-8 sequence is split.

    A `plain` literal (printable ASCII, no backslash: base64, most long texts) is its own text, made a str in one
    call: a quarter of the GIL orjson's windows and their join held (bench/bigbodies.py)."""
    if plain(raw, start, end):
        return str(memoryview(raw)[start:end], "ascii")
    return "".join(_decoded(raw, start, end))


def _decoded(raw: bytes, start: int, end: int) -> Iterator[str]:
    """The windows of `string_value`, one orjson call each."""
    while start < end:
        cut = end if end - start <= WINDOW else _boundary(raw, start, start + WINDOW)
        try:
            yield orjson.loads(b'"%b"' % raw[start:cut])
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc.msg} at position {start + exc.pos - 1}",
                             code="invalid_json") from None
        start = cut


def _boundary(raw: bytes, start: int, at: int) -> int:
    """A position after `start` (near `at`) where a window of string content may end: not inside an escape, a
    surrogate pair or a UTF-8 sequence."""
    backslash = raw.rfind(b"\\", max(start, at - 12), at)
    if backslash >= 0 and _escaped(raw, backslash + 1):  # it begins an escape: end the window before it
        at = backslash
        if at - 6 >= start and _HIGH_SURROGATE.fullmatch(raw, at - 6, at) and _escaped(raw, at - 5):
            at -= 6  # ... and before the high half of its surrogate pair
    while at > start and 0x80 <= raw[at] < 0xC0:
        at -= 1
    return at if at > start else start + _token_length(raw, start)


def _token_length(raw: bytes, at: int) -> int:
    """Bytes of the escape, surrogate pair or UTF-8 character at `at` (a window too small for anything else)."""
    if raw[at] == 0x5C:
        if _HIGH_SURROGATE.fullmatch(raw, at, at + 6) and raw[at + 6:at + 8] == b"\\u":
            return 12
        return 6 if raw[at + 1:at + 2] == b"u" else 2
    return 1 if raw[at] < 0xC0 else 2 if raw[at] < 0xE0 else 3 if raw[at] < 0xF0 else 4


def put_back(data: Any, values: dict[str, str]) -> None:
    """Replace every placeholder (as a value or a key) by its string, in place; visits containers only."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str):
                    if value in values:
                        node[key] = values[value]
                elif isinstance(value, (dict, list)):
                    stack.append(value)
            if any(key in values for key in node):  # keys rebuilt in their order (a later duplicate still wins)
                items = list(node.items())
                node.clear()
                node.update((values.get(key, key), value) for key, value in items)
        else:
            for i, value in enumerate(node):
                if isinstance(value, str):
                    if value in values:
                        node[i] = values[value]
                elif isinstance(value, (dict, list)):
                    stack.append(value)
