"""Issue #21, item 3: large bodies must not stall the event loop. Concurrent image-carrying bodies of tens of MiB
against `vilms serve` (its own process, uvloop + httptools as deployed) while /health_check is polled.

The old gateway joined, parsed (orjson) and base64-decoded every body on the event loop: six 36 MiB bodies sent at
once held /health_check for 0.6-0.85 s on the 2-core VM (eight 64 MiB ones: 1.8-6.3 s, bench/results/bigbodies.md).
"""

from __future__ import annotations

import base64
import io
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest
import yaml
from PIL import Image

from tests.serve.test_hardening import openai_config
from tests.support import ROOT, free_port, mock_backend, subprocess_server

CHAT = "/v1/chat/completions"
BOUND = 0.2  # s added to the worst /health_check: the old code added 0.58-0.85 s here, this one 0.04-0.11 s (load 2-6)


def noise_png(side: int, seed: int) -> bytes:
    """Random pixels: incompressible, so a few MiB of PNG, and over 1024 px (the gateway must resize it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def image_body(images: list[bytes]) -> bytes:
    parts = [{"type": "text", "text": "compare"}]
    parts += [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}
              for raw in images]
    return orjson.dumps({"model": "LLM", "max_tokens": 4, "messages": [{"role": "user", "content": parts}]})


def post(port: int, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n" % (CHAT.encode(), len(body)))
        sock.sendall(body)  # not concatenated: a copy of each body here would hold this process's GIL (the prober's)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply.partition(b"\r\n\r\n")[2]


def while_probing(url: str, port: int, bodies: list[bytes]) -> tuple[list[tuple[int, bytes]], float]:
    """Send `bodies` at once while a thread polls /health_check on its own connection: (answers, worst lag)."""
    lags: list[float] = []
    ready, stop = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            client.get("/health_check")
            ready.set()
            while True:
                started = time.perf_counter()
                assert client.get("/health_check").status_code == 200
                lags.append(time.perf_counter() - started)
                if stop.is_set():
                    return
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    assert ready.wait(30)
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: post(port, body), bodies))
    finally:
        stop.set()
        prober.join()
    return answers, max(lags)


@pytest.mark.timeout(120)
def test_concurrent_large_image_bodies_do_not_stall_health_check(tmp_path):
    """Six 36 MiB bodies (three ~9 MiB noise PNGs each, as data URLs) at once: every one is answered 200 with its
    images resized to 1024 px, and the attack adds less than BOUND to the worst /health_check (the issue's 50 ms
    goal for 8 x 64 MiB is measured by bench/bigbodies.py, not asserted: it moves with the machine's load).

    As in test_hardening: the machine's own noise right then (the same probe around one small image request) is
    measured before each attempt, at most 3 attempts, and the best counts: other jobs on a shared machine add
    delay to a measurement, never remove it, while a stall the requests cause shows every time."""
    pngs = [noise_png(1750, seed) for seed in range(3)]
    body = image_body(pngs)
    assert 32 * 2**20 < len(body) < 40 * 2**20
    harmless = image_body([noise_png(64, 9)])
    with mock_backend(tokens=2) as backend:
        config = tmp_path / "config.yaml"
        budget = {"max-inflight-body-bytes": 2**29, "max-key-body-bytes": 2**29}  # six bodies at once (default: five)
        config.write_text(yaml.safe_dump(openai_config(backend.url, **budget)))
        port = free_port()
        args = [sys.executable, "-m", "vilms", "serve", "--config", str(config), "--host", "127.0.0.1", "--port",
                str(port)]
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), str(ROOT)])}
        added = []
        with subprocess_server(args, "/health_check", port, env=env) as url:
            for _ in range(3):
                _, noise = while_probing(url, port, [harmless])
                answers, lag = while_probing(url, port, [body] * 6)
                assert [status for status, _ in answers] == [200] * 6, answers[0][1][:500]
                added.append(lag - noise)
                if added[-1] < BOUND:
                    break
        sent = backend.backend.last_request["messages"][0]["content"]
    assert min(added) < BOUND, f"the bodies delayed /health_check by {[round(x * 1000) for x in added]} ms"
    for part in sent[1:]:
        header, _, data = part["image_url"]["url"].partition(",")
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert header == "data:image/jpeg;base64" and max(image.size) == 1024


@pytest.fixture()
def small_windows(monkeypatch):
    """The large-body road with tiny strides, so that every window edge lands inside escapes, surrogate pairs
    and UTF-8 sequences somewhere in these bodies."""
    from vilms.serve.api import bodies

    monkeypatch.setattr(bodies, "LONG", 64)
    monkeypatch.setattr(bodies, "WINDOW", 7)
    monkeypatch.setattr(bodies, "STEP", 5)
    return bodies


TRICKY = ['plain ' * 40, 'quote \\" and backslash \\\\ ' * 12, '\\\\' * 100 + '\\"', 'é猫😀 ' * 30,
          '\\u00e9\\ud83d\\ude00\\n\\t\\/' * 20, 'x' * 63, 'data:image/png;base64,' + 'QUJD' * 50]


@pytest.mark.parametrize("buffer", [bytes, bytearray])  # read_body fills a bytearray for a declared large body
@pytest.mark.parametrize("offset", range(7))
def test_large_road_parses_exactly_as_orjson(small_windows, offset, buffer):
    """Long strings of every kind (escapes, escaped quotes and backslashes, surrogate pairs, UTF-8), as values, list
    items and keys, shifted so window edges fall everywhere: the same dict as orjson.loads of the whole body."""
    from vilms.serve.api.requests import _loads

    texts = ["a" * offset + text for text in TRICKY]
    raw = ('{"model": "m", "messages": [%s], "%s": 1, "n": [1, 2.5, true, null]}' % (
        ", ".join('{"role": "user", "content": "%s"}' % t for t in texts), texts[1])).encode()
    expected, raw = orjson.loads(raw), buffer(raw)
    assert small_windows.long_strings(raw)  # the road really lifted strings here
    assert small_windows.parse_large(raw, None, _loads) == expected


def test_long_texts_of_plain_letters_digits_and_spaces_are_lifted_and_long_blank_runs_refused(small_windows):
    """A long text with no byte that only strings hold ("aaaa…", digits, spaces) was never lifted, so one regex and
    one orjson call went over all of it (63 MiB: 335 ms holding the GIL); it is lifted now, parsed as orjson does.
    Outside strings, such a stretch can only be a whitespace run or one token that long: refused (400)."""
    from vilms.errors import BadRequest
    from vilms.serve.api.requests import _loads

    for text in ("a" * 200, "1234567890" * 20, "true false null " * 15, " " * 200):
        raw = ('{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % text).encode()
        assert small_windows.long_strings(raw), text[:20]
        assert small_windows.parse_large(raw, None, _loads) == orjson.loads(raw)
    blank = b'{"model": "m",' + b" " * 200 + b'"messages": []}'
    with pytest.raises(BadRequest) as refused:
        small_windows.parse_large(blank, None, _loads)
    assert refused.value.code == "invalid_json"


def test_large_road_keeps_key_order_and_the_last_duplicate_as_orjson(small_windows):
    """A lifted key stays where it was among its object's keys, and of two equal keys (one lifted, one written
    as an escape-free twin) the later wins, as orjson decides (a dict compares equal whatever its order)."""
    from vilms.serve.api.requests import _loads

    key = "k" * 300
    raw = ('{"x": {"%s": 1, "b": 2, "\\u006b%s": 3}, "y": {"%s": 1, "b": 2}}' % (key, key[1:], key)).encode()
    expected = orjson.loads(raw)
    got = small_windows.parse_large(raw, None, _loads)
    assert got == expected and [list(v) for v in got.values()] == [list(v) for v in expected.values()]
    assert got["x"][key] == 3


@pytest.mark.parametrize("raw", [b'{"a": "' + b"x" * 300, b'{"a": "' + b"x" * 200 + b'\x01' + b'y' * 100 + b'"}',
                                 b'{"a": "\x1f' + b"x" * 300 + b'"}', b'{"a": "' + b"x" * 300 + b'\x00"}',
                                 b'{"a": "' + b"x" * 200 + b'\\q' + b'y' * 100 + b'"}',
                                 b'{"a": "' + b"x" * 200 + b'\xff' + b'y' * 100 + b'"}',
                                 b'{"a": ' + b"x" * 300 + b'"}', b'["' + b"x" * 300 + b'"]'])
@pytest.mark.parametrize("buffer", [bytes, bytearray])
def test_large_road_refuses_what_orjson_refuses(small_windows, raw, buffer):
    """Unterminated, control characters, bad escapes, invalid UTF-8, bare words, a non-object: 400 invalid_json."""
    from vilms.errors import BadRequest
    from vilms.serve.api.requests import _loads

    if not raw.startswith(b"["):  # orjson refuses the others itself
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
    with pytest.raises(BadRequest) as refused:
        small_windows.parse_large(buffer(raw), None, _loads)
    assert refused.value.code == "invalid_json"


def chat_with_long_texts(texts: list[str]) -> bytes:
    """A chat whose long strings sit where the large road keeps them as literals (a message's content, a text
    part's text) and where it must not (an image URL, a metadata value, a key)."""
    return ('{"model": "LLM", "max_tokens": 4, "messages": [{"role": "system", "content": "%s"}, {"role": "user", '
            '"content": [{"type": "text", "text": "%s"}, {"type": "image_url", "image_url": {"url": "%s"}}]}], '
            '"metadata": {"note": "%s"}}' % tuple(texts)).encode()


@pytest.mark.parametrize("offset", range(3))
def test_message_texts_stay_literals_and_are_forwarded_as_sent(small_windows, offset):
    """The chat road never makes a long message text a Python string: the body holds a placeholder that passes
    validation, the forwarded JSON carries the client's literal byte for byte, and it means what orjson reads."""
    from vilms.serve.api.requests import ChatRequest, _loads, validated
    from vilms.serve.large import serialised

    texts = ["a" * offset + text for text in (TRICKY[1], TRICKY[4], TRICKY[6], TRICKY[3])]
    raw = chat_with_long_texts(texts)
    body = small_windows.parse_large(raw, None, _loads, True)
    assert sorted(body.texts.values()) == [(raw.index(t.encode()) - 1, raw.index(t.encode()) + len(t.encode()))
                                           for t in texts[:3]]  # the message texts and the plain image URL only
    url = body["messages"][1]["content"][1]["image_url"]["url"]
    assert bytes(body.literal(url)) == texts[2].encode() and body.literal(texts[2]) is None
    assert body["metadata"]["note"] == texts[3]  # elsewhere a long string is a string
    validated(ChatRequest, body, {})
    sent = b"".join(serialised(body))
    assert orjson.loads(sent) == orjson.loads(raw)
    assert all(b'"%s"' % t.encode() in sent for t in texts[:3])
    assert small_windows.materialise(body) == orjson.loads(raw)  # what an adapter that reads them gets


@pytest.mark.parametrize("url", ['data:image/png;base64,' + 'QUJD' * 60 + '\\n' + 'QUJD',  # an escape
                                 'data:image/png;base64,' + 'QUJD' * 60 + '\u00e9',  # not ASCII
                                 'data:image/png;base64,' + 'QUJD' * 60 + '\\/QUJD'])  # an escaped slash (PHP)
def test_an_image_url_that_is_not_plain_ascii_becomes_a_string(small_windows, url):
    """Only a literal whose bytes are its text (printable ASCII, no escape) is kept for decoding in place."""
    from vilms.serve.api.requests import _loads

    raw = chat_with_long_texts(["s" * 100, "t" * 100, url, "m"])
    body = small_windows.parse_large(raw, None, _loads, True)
    value = body["messages"][1]["content"][1]["image_url"]["url"]
    assert body.literal(value) is None and value == orjson.loads(raw)["messages"][1]["content"][1]["image_url"]["url"]


def test_used_image_literals_are_forgotten_and_the_body_freed_when_nothing_else_needs_it(small_windows):
    """Once images are prepared, their literals are dropped (review: Ollama's adapter made 44 MiB of strings of
    them); the received body goes once no message text is kept."""
    from vilms.serve.api.requests import _loads

    url = "data:image/png;base64," + "QUJD" * 60
    raw = chat_with_long_texts(["s" * 100, "t" * 100, url, "m"])
    body = small_windows.parse_large(raw, None, _loads, True)
    assert len(body.texts) == 3 and len(body.images) == 1
    body.images_used()
    assert len(body.texts) == 2 and not body.images and body.raw
    short = chat_with_long_texts(["s", "t", url, "m"])
    only_image = small_windows.parse_large(short, None, _loads, True)
    assert list(only_image.texts) == list(only_image.images)
    only_image.images_used()
    assert not only_image.texts and not only_image.raw


def test_a_kept_message_text_is_still_checked(small_windows):
    from vilms.errors import BadRequest
    from vilms.serve.api.requests import _loads

    raw = chat_with_long_texts(["x" * 200 + "\\q", "ok", "u", "n"])
    with pytest.raises(BadRequest) as refused:
        small_windows.parse_large(raw, None, _loads, True)
    assert refused.value.code == "invalid_json"


def test_large_chat_bodies_reach_the_engine_unchanged():
    """Through the served gateway (1 MiB and more: the large road): a 1.5 MiB text with escapes and CJK, kept as
    a literal and sent in pieces, and a body of ~30,000 values parsed and serialised in pieces; the engine gets
    what the client sent."""
    from tests.serve.test_hardening import openai_config
    from tests.support import gateway

    line = 'Le "chat" dort près de la fenêtre; 猫は窓のそばで眠る.\n'
    text = {"model": "LLM", "max_tokens": 4, "messages": [{"role": "user", "content": line * 25_000}]}
    many = {"model": "LLM", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "w%d" % i}] * 4} for i in range(2500)]}
    with mock_backend(tokens=2) as backend, gateway(openai_config(backend.url)) as gw:
        for body in (text, many):
            answer = httpx.post(gw.url + CHAT, content=orjson.dumps(body), timeout=60,
                                headers={"content-type": "application/json"})
            assert answer.status_code == 200, answer.text
            assert backend.backend.last_request["messages"] == body["messages"]
        # the pass over a large body's parts (in the body thread) still refuses a part type, naming it
        many["messages"][1234] = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video_url"}]}
        refused = httpx.post(gw.url + CHAT, content=orjson.dumps(many), timeout=60,
                             headers={"content-type": "application/json"})
        assert refused.status_code == 400 and "messages[1234].content[1]" in refused.json()["error"]["message"]


def test_the_body_thread_leaves_cyclic_garbage_to_the_collector():
    """Cyclic garbage the loop made before a large body's work (an error path keeping a traceback) is still
    collected after it: a gc.freeze() there put it in the permanent generation for good."""
    import gc
    import weakref

    from vilms.serve.large import Bodies, _uncollected

    class Node:
        pass

    def garbage_cycle() -> weakref.ref:
        node = Node()
        node.self = node
        return weakref.ref(node)

    gone = garbage_cycle()
    Bodies.executor.submit(_uncollected, lambda: None).result(10)  # what a body of many values is parsed in
    gc.collect()
    assert gone() is None


def test_discard_frees_long_lists_in_the_body_thread():
    from vilms.serve.large import Bodies, discard

    holder = {"messages": [{"a": [1]}] * 1000, "short": [1, 2]}
    discard(holder)
    Bodies.executor.submit(lambda: None).result(10)
    assert holder == {"messages": [], "short": [1, 2]}


@pytest.mark.parametrize("shape", ["many messages", "one message of many parts"])
def test_a_large_body_is_serialised_in_short_calls_and_sent_as_pieces(monkeypatch, shape):
    """The engine adapter used to run one orjson.dumps over the whole forwarded body on the event loop (45-50 ms at
    64 MiB); a large body is now made in calls of about large.PIECE bytes, and handed to the engine's client as those pieces."""
    import asyncio

    from vilms.serve import large
    from vilms.serve.api.requests import _loads
    from vilms.serve.api.bodies import parse_large

    texts = ("w" * 200, "猫 \"q\"\n" * 30) * 3000
    messages = ([{"role": "user", "content": [{"type": "text", "text": t}]} for t in texts] if shape == "many messages"
                else [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}])  # was one call
    raw = orjson.dumps({"model": "m", "n": 1, "messages": messages})
    body = parse_large(raw, None, _loads)
    sizes: list[int] = []
    real = orjson.dumps
    monkeypatch.setattr(large.orjson, "dumps", lambda value: sizes.append(len(out := real(value))) or out)
    payload = asyncio.run(large.forwarded(body))
    assert isinstance(payload, list) and len(payload) > 1
    assert orjson.loads(b"".join(payload)) == orjson.loads(raw)
    assert len(raw) > 2**20 and max(sizes) <= 2 * large.PIECE


def test_a_body_of_many_values_is_never_one_long_orjson_call(monkeypatch):
    """~130,000 short values in 4 MiB (nothing long enough to lift): the old road parsed the whole skeleton in one
    orjson call (390 ms at 64 MiB, holding the GIL); no call may now see more than a mebibyte."""
    from vilms.serve.api.bodies import parse_large
    from vilms.serve.api.requests import _loads

    message = {"role": "user", "content": [{"type": "text", "text": "lorem ipsum " * 8}] * 4}
    raw = orjson.dumps({"model": "m", "messages": [message] * 8500})
    sizes: list[int] = []
    real = orjson.loads
    monkeypatch.setattr(orjson, "loads", lambda text: sizes.append(len(text)) or real(text))
    assert parse_large(raw, None, _loads) == real(raw)
    assert len(raw) > 4 * 2**20 and max(sizes) < 2**20


@pytest.mark.parametrize("broken", [b'}, ]}', b'} {"role"', b'}]]}', b'}, {"role": "user", "content": "x"]}'])
def test_an_invalid_body_of_many_values_is_a_400(monkeypatch, broken):
    """A trailing comma, a missing comma, a mismatched bracket, an unclosed object at the end of ~1,000 messages,
    cut in runs of 64 bytes (guessed and exact cuts both meet the fault): 400 invalid_json, as orjson refuses it."""
    from vilms.errors import BadRequest
    from vilms.serve.api import jsonsplit
    from vilms.serve.api.bodies import parse_large
    from vilms.serve.api.requests import _loads

    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi %d" % i} for i in range(1000)]})
    raw = raw[:-3] + broken
    monkeypatch.setattr(jsonsplit, "PIECE", 64)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    with pytest.raises(BadRequest) as refused:
        parse_large(raw, None, _loads)
    assert refused.value.code == "invalid_json"
