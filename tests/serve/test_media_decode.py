"""vilms.serve.media.decode_data_url: a data URL's payload decoded as base64.b64decode(validate=False) decodes it
(same bytes, refused where it refuses) for what clients send (canonical, unpadded, MIME-wrapped, stray characters),
whichever road it takes (strict pybase64 pieces, or the lenient road that drops what is not base64 a slice at a
time), wherever the pieces and slices are cut (tiny sizes: every boundary case is met), from a string or from a
view of the received body. Padding before the end (binascii stops there, pybase64 reads on) is refused."""

from __future__ import annotations

import base64
import binascii
import os
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vilms.serve import media

NOISE = st.sampled_from(["\n", "\r\n", " ", "-", "_", "*", "é", "\t"])


def outcome(decode, payload: str):
    try:
        return "ok", decode(payload)
    except (binascii.Error, ValueError):
        return "refused", None


def expected(payload: str):
    return outcome(lambda text: base64.b64decode(text, validate=False), payload)


def decoded(payload: str, piece: int):
    """As a string, and (ASCII payloads) as a view of a received body, the way a kept literal is decoded: the same."""
    url = "data:image/png;base64," + payload
    with patch.object(media, "B64_PIECE", piece), patch.object(media, "B64_SLICE", piece + 1):
        results = {outcome(lambda text: media.decode_data_url(text, 1 << 20), url)}
        if url.isascii():
            results.add(outcome(lambda text: media.decode_data_url(memoryview(text.encode()), 1 << 20), url))
    assert len(results) == 1, results
    return results.pop()


@st.composite
def payloads(draw) -> str:
    """Base64 as clients write it: canonical, unpadded, wrapped, or with stray characters anywhere."""
    text = base64.b64encode(draw(st.binary(max_size=60))).decode()
    if draw(st.booleans()):
        text = text.rstrip("=") if draw(st.booleans()) else text
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(NOISE) + text[at:]
    return text


@settings(max_examples=600, deadline=None)
@given(payloads(), st.sampled_from([4, 8, 12, 1 << 22]))
def test_a_data_url_decodes_as_b64decode_does(payload, piece):
    assert decoded(payload, piece) == expected(payload)


@pytest.mark.parametrize("payload", ["QUJD\nQUJD", "QUJDQUI", "QUJD\r\nQQ==", " QUJD QQ== "])
def test_breaks_at_a_piece_boundary_decode_as_b64decode_does(payload):
    for piece in (4, 8, 12):
        assert decoded(payload, piece) == expected(payload), piece


@pytest.mark.parametrize("payload", ["QQ==QUJD", "QUJDQQ==QUJD", "=AA==", "\nAA==A=", "QQ==QQ==", "QUJ=D"])
def test_padding_before_the_end_is_refused(payload):
    for piece in (4, 8, 12, 1 << 22):
        assert decoded(payload, piece) == ("refused", None), piece


def test_canonical_base64_takes_the_strict_road_in_pieces():
    """The strict road decodes a 4 MiB image in pieces, one strict pybase64 call each (none over the whole)."""
    raw = os.urandom(4 << 20)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    calls = []
    real = media.pybase64.b64decode

    def counted(piece, validate=False):
        assert validate, "the lenient road was taken"
        calls.append(len(piece))
        return real(piece, validate=validate)

    with patch.object(media.pybase64, "b64decode", counted):
        assert media.decode_data_url(url, 5 << 20) == raw
    assert len(calls) == 2 and max(calls) <= media.B64_PIECE


def test_decode_threads_run_below_the_event_loop_priority():
    """Pillow runs with the GIL released, so decode threads compete with the event loop for cores: they run at
    nice DECODE_NICE above the process's own value (Linux: per thread)."""
    import threading

    if not hasattr(os, "setpriority"):
        pytest.skip("no per-thread priorities here")
    decoder = media.Decoder(1)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = decoder.executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        decoder.close()
    assert theirs == min(19, mine + media.DECODE_NICE) and media.DECODE_NICE > 0
