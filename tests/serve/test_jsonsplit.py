"""vilms.serve.api.jsonsplit: a JSON text parsed in pieces must be exactly what orjson.loads makes of it, and
refused exactly where orjson refuses it, wherever the pieces are cut (tiny PIECE: every element is split)."""

from __future__ import annotations

import json
from unittest.mock import patch

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vilms.serve.api import jsonsplit

TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('ab ,:[]{}"\\/\n\té猫😀') + ["\x00", "\u2028"]), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False,
                                                                                   allow_infinity=False) | TRICKY_TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY_TEXT, inner,
                                                                                            max_size=5), max_leaves=40)
PIECES = [1, 5, 23, 1 << 20]


def outcome(parse, text: bytes):
    try:
        return "ok", parse(text)
    except (orjson.JSONDecodeError, jsonsplit.Invalid):
        return "refused", None


def split_loads(text: bytes, piece: int):
    with patch.object(jsonsplit, "PIECE", piece):
        return jsonsplit.loads(text)


@st.composite
def json_texts(draw) -> bytes:
    """A JSON text as different writers lay it out: compact, spaced, indented, ASCII-escaped."""
    value = draw(VALUES)
    indent = draw(st.sampled_from([None, 0, 2]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\r\n", " :\t")]))
    return json.dumps(value, indent=indent, separators=separators, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_texts())
def test_same_value_as_orjson_wherever_the_pieces_are_cut(text):
    expected = orjson.loads(text)
    for piece in PIECES:
        assert split_loads(text, piece) == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_texts(), st.integers(0, 10_000), st.sampled_from(list(b',:[]{}" \\x1\x0c') + [None]))
def test_refused_exactly_where_orjson_refuses(text, at, byte):
    """A byte dropped or inserted anywhere (trailing commas, missing ones, unbalanced or mismatched brackets, a form
    feed as whitespace, a broken string): refused iff orjson refuses, else the same value."""
    at %= len(text) + 1
    mutated = text[:at] + (b"" if byte is None else bytes([byte])) + text[at + (byte is None):]
    expected = outcome(orjson.loads, mutated)
    for piece in PIECES:
        assert outcome(lambda t: split_loads(t, piece), mutated) == expected, (mutated, piece)


FOOLING = st.lists(st.sampled_from(['{"k"', ', {"k"', ',{"k":', '"', '\\', "]", "}", "x"]), max_size=6).map("".join)


@st.composite
def messages_texts(draw) -> bytes:
    """Arrays of objects that all begin with the same key (the guessed cuts' case), with that key's bytes inside
    strings (escaped there, so never a cut) and opening nested objects (a wrong cut: orjson refuses the run)."""
    nested = st.lists(st.fixed_dictionaries({"k": FOOLING}), max_size=3)  # the first key's bytes one level down
    items = draw(st.lists(st.fixed_dictionaries({"k": FOOLING}, optional={"v": VALUES | nested}), min_size=1,
                          max_size=30))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n ", ":")]))
    return json.dumps({"m": items}, separators=separators, ensure_ascii=False).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages_texts(), st.integers(0, 10_000), st.sampled_from(list(b',:[]{}" \\') + [None]))
def test_guessed_cuts_are_exact_or_dropped(text, at, byte):
    at %= len(text) + 1
    mutated = text[:at] + (b"" if byte is None else bytes([byte])) + text[at + (byte is None):]
    for candidate in (text, mutated):
        expected = outcome(orjson.loads, candidate)
        for piece in (16, 40, 97):
            assert outcome(lambda t: split_loads(t, piece), candidate) == expected, (candidate, piece)


@pytest.mark.parametrize("text", [
    b'{"a": 1, "b": [1, 2], "a": {"x": 1}}',  # a duplicate key: the last value, in the first key's place
    b'{"a": [], "b": {}, "c": [[], [{}]], "d": ""}',
    b' \n[ "],[", "\\"},{\\"", "\\\\", "\\\\\\"]" ] \r\n',
    b'{"k": "\\ud83d\\ude00\\u00e9", "n": [-0, 0.5e-3, 1E+2, 18446744073709551615, -9223372036854775808]}',
    b'[true, false, null, "x"]', b'"top-level string"', b'12', b'[]', b'{}',
])
def test_tricky_texts(text):
    for piece in PIECES:
        assert outcome(lambda t: split_loads(t, piece), text) == outcome(orjson.loads, text)


@pytest.mark.parametrize("text", [b'[1,]', b'{"a":1,}', b'[1 2]', b'[{} {}]', b'[1,2', b'{"a" 1}', b'[1}',
                                  b'[,1]', b'{,}', b'[1]\x0c', b'[\x0c1]', b'{"a":1} x', b'[NaN]', b'', b'  '])
def test_invalid_texts_are_refused(text):
    for piece in PIECES:
        assert outcome(lambda t: split_loads(t, piece), text) == ("refused", None)


def test_no_orjson_call_is_handed_more_than_a_piece():
    """The point of it: a body of many values is never one long orjson call (the old road parsed a 64 MiB skeleton
    in one call, 110-390 ms holding the GIL)."""
    message = {"role": "user", "content": [{"type": "text", "text": "w" * 90}] * 3}
    body = orjson.dumps({"model": "m", "messages": [message] * 4000})
    sizes: list[int] = []
    real = orjson.loads

    def counted(piece):
        sizes.append(len(piece))
        return real(piece)

    with patch.object(jsonsplit, "PIECE", 1 << 16), patch.object(jsonsplit.orjson, "loads", counted):
        assert jsonsplit.loads(body) == real(body)
    assert len(body) > 1 << 20 and max(sizes) <= (1 << 16) + 2


@pytest.mark.parametrize("piece", PIECES)
def test_a_bytearray_parses_as_bytes_do(piece):
    """The gateway reads a declared large body into a bytearray (api.requests.read_body): same value, same refusal."""
    text = b'{"a": [1, {"b": [true, null, "x"]}, [[], {}]], "c": {"d": [1.5, "e"]}}'
    assert split_loads(bytearray(text), piece) == orjson.loads(text)
    assert outcome(lambda t: split_loads(t, piece), bytearray(text[:-1])) == ("refused", None)
