"""Issue #15's attacks, each reproduced against the gateway over real HTTP with stand-in engines.

Every test here failed on the code before the hardening (see the issue for the numbers) and passes after.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import sys
import threading
import time

import httpx
import orjson
import pytest
import yaml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support import ROOT, ThreadedServer, free_port, gateway, mock_backend, subprocess_server

JSON_HEADERS = {"content-type": "application/json"}


def openai_config(url: str, params: dict | None = None, **gateway_settings) -> dict:
    return {"serving": {"engine": "openai", "base-url": url,
                        "models": [{"name": "mock", "type": "vlm", "engine": "openai", "aliases": ["LLM"], "params": params or {}}]},
            "gateway": gateway_settings}


def ollama_config(url: str, params: dict | None = None) -> dict:
    return {"host": {"platform": "js"},
            "serving": {"engine": "ollama", "ollama-base-url": url,
                        "models": [{"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM"], "params": params or {}},
                                   {"name": "nomic-embed-text", "type": "embedding", "engine": "ollama"}]}}


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def running_gauge(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m) for m in re.findall(r"^vilms:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def counted(url: str, status: str, model: str = "qwen2.5vl:3b", route: str = "chat") -> float:
    """vilms:requests_total for one model and status (the registry is process-wide: compare before/after)."""
    text = httpx.get(url + "/metrics").text
    pattern = rf'^vilms:requests_total\{{[^}}]*model="{re.escape(model)}",route="{route}",status="{status}"\}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.M))


def png(size=(16, 16), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, fmt)
    return out.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def user(parts) -> dict:
    return {"role": "user", "content": parts}


@pytest.fixture()
def backend():
    with mock_backend(tokens=2) as server:
        yield server


# --- 1. one small request must not freeze the event loop --------------------------------------------------------

def attack_while_probing(url: str, body: bytes) -> tuple[httpx.Response, float, float]:
    """Send `body` while a second client polls /health_check on its own connection: (response, seconds, worst lag)."""
    lags: list[float] = []
    ready, stop = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            client.get("/health_check")  # connection open before the attack starts
            ready.set()
            while True:  # at least one timed probe, however quickly the attack is answered
                started = time.perf_counter()
                assert client.get("/health_check").status_code == 200
                lags.append(time.perf_counter() - started)
                if stop.is_set():
                    return

    prober = threading.Thread(target=probe)
    prober.start()
    assert ready.wait(30)
    try:
        started = time.perf_counter()
        response = httpx.post(url + "/v1/chat/completions", content=body, headers=JSON_HEADERS, timeout=5)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        prober.join()
    return response, elapsed, max(lags)


def test_80000_empty_image_parts_refused_fast_and_health_check_never_stalls(backend, tmp_path):
    """The quadratic media scan: a 1.7 MB body of empty image_url parts stalled the loop for 26 s.

    The gateway runs in its own process. On a shared machine other jobs add scheduling delay to any one
    measurement, never remove it, while a stall caused by the request would show every time: so each attack
    is preceded by the same measurement around a harmless request (the machine's own noise right then),
    repeated at most 3 times, and in the best run the attack may add at most 50 ms to the worst health check.
    """
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(openai_config(backend.url)))
    port = free_port()
    args = [sys.executable, "-m", "vilms", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), str(ROOT)])}
    body = orjson.dumps({"model": "LLM", "messages": [user([{"type": "image_url", "image_url": {"url": ""}}] * 80_000)]})
    assert len(body) > 1_500_000
    harmless = orjson.dumps({"model": "LLM", "messages": [user([{"type": "image_url", "image_url": {"url": ""}}])]})
    added = []
    with subprocess_server(args, "/health_check", port, env=env) as url:
        for _ in range(3):
            _, _, noise = attack_while_probing(url, harmless)
            response, elapsed, lag = attack_while_probing(url, body)
            assert 400 <= response.status_code < 500, response.text
            assert elapsed < 1.0, elapsed
            added.append(lag - noise)
            if added[-1] < 0.05:
                break
    assert min(added) < 0.05, f"the attack delayed health_check by {[round(x * 1000) for x in added]} ms"
    assert backend.backend.stats["requests"] == 0


def test_body_of_many_small_values_is_refused_before_parsing(backend):
    """11 MiB of tiny messages used to become ~100 MiB of Python objects; the value count is checked first."""
    body = orjson.dumps({"model": "LLM", "messages": [{"role": "user", "content": "x"}] * 400_000})
    assert len(body) > 11 * 2**20
    with gateway(openai_config(backend.url)) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", content=body, headers=JSON_HEADERS, timeout=30)
        assert assert_envelope(response, 400)["code"] == "too_many_json_values"
        assert httpx.get(gw.url + "/metrics").status_code == 200
    assert backend.backend.stats["requests"] == 0


# --- 2. part types the guard does not inspect never reach an engine ---------------------------------------------

@pytest.mark.parametrize("part", [
    {"type": "input_image", "image_url": "http://127.0.0.1:1/secret.png"},
    {"type": "video_url", "video_url": {"url": "http://127.0.0.1:1/secret.mp4"}},
    {"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:1/secret.wav"}},
])
def test_bypass_part_types_are_400_naming_the_part(backend, part):
    with gateway(openai_config(backend.url)) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [user([{"type": "text", "text": "look"}, part])]})
        error = assert_envelope(response, 400)
        assert error["param"] == "messages[0].content[1]" and part["type"] in error["message"]
        assert running_gauge(gw.url) == 0
    assert backend.backend.stats["requests"] == 0


# --- 3. decode limits -------------------------------------------------------------------------------------------

def test_total_images_per_request_is_capped_across_messages(backend):
    """max-frames samples per message; the total over all messages has its own cap, checked before decoding."""
    config = openai_config(backend.url, params={"max-frames": 2})
    config["media"] = {"max-images": 4}
    messages = [user([{"type": "image_url", "image_url": {"url": data_url(png())}}] * 2) for _ in range(3)]
    with gateway(config) as gw:
        error = assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM", "messages": messages}), 400)
        assert "images" in error["message"] and error["code"] == "too_many_images"
        ok = httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM", "messages": messages[:2]})
        assert ok.status_code == 200
    assert backend.backend.stats["requests"] == 1


def test_image_bytes_and_decoder_formats_are_limited(backend):
    config = openai_config(backend.url)
    config["media"] = {"max-bytes": 4096}
    noisy = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noisy, "PNG")
    with gateway(config) as gw:
        too_big = httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [user([{"type": "image_url", "image_url": {"url": data_url(noisy.getvalue())}}])]})
        assert "bytes" in assert_envelope(too_big, 400)["message"]
        for fmt, mime in (("BMP", "image/bmp"), ("TIFF", "image/tiff"), ("PCX", "image/x-pcx")):
            response = httpx.post(gw.url + "/v1/chat/completions", json={
                "model": "LLM", "messages": [user([{"type": "image_url", "image_url": {"url": data_url(png(fmt=fmt), mime)}}])]})
            assert assert_envelope(response, 400)["code"] == "invalid_image", fmt
        for fmt in ("JPEG", "PNG", "WEBP", "GIF"):
            response = httpx.post(gw.url + "/v1/chat/completions", json={
                "model": "LLM", "messages": [user([{"type": "image_url", "image_url": {"url": data_url(png(fmt=fmt))}}])]})
            assert response.status_code == 200, (fmt, response.text)


# --- 6. wrong types are 400s, and the running gauge comes back to 0 ---------------------------------------------

WRONG_TYPES = [
    {"response_format": "json"},
    {"response_format": {"type": 5}},
    {"response_format": {"type": "json_object", "": None}},   # found by schemathesis: an empty key crashed the error path
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]},
    {"messages": [user([{"type": "text", "text": 5}])]},
    {"messages": [user([{"type": "text"}])]},
    {"messages": [user([{"type": "image_url", "image_url": 7}])]},
    {"tools": [{"type": "function"}]},
    {"top_p": False},
    {"temperature": "0.5"},
    {"stream": "false"},
    {"max_tokens": 1.5},
    {"stop": [1, 2]},
    {"reasoning_effort": ["high"]},
]


@pytest.mark.parametrize("change", WRONG_TYPES, ids=[orjson.dumps(c).decode()[:40] for c in WRONG_TYPES])
def test_wrong_types_are_400_and_nothing_reaches_either_engine(ollama_standin, backend, change):
    config = ollama_config(ollama_standin.url)
    config["serving"]["models"].append({"name": "mock", "engine": "openai", "base-url": backend.url})
    with gateway(config) as gw:
        for model in ("VLM", "mock"):
            body = {"model": model, "messages": [user("hi")], **change}
            assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json=body), 400)
        assert running_gauge(gw.url) == 0
    assert [kind for kind, _ in ollama_standin.state["requests"]] == []
    assert backend.backend.stats["requests"] == 0


def ragged_embedder() -> Starlette:
    """A compromised engine: 200 with vectors of different lengths."""
    async def embed(request: Request) -> Response:
        return Response(b'{"embeddings": [[0.1, 0.2], [0.3]], "prompt_eval_count": 2}', media_type="application/json")

    async def version(request: Request) -> Response:
        return Response(b'{"version":"x"}', media_type="application/json")

    return Starlette(routes=[Route("/api/embed", embed, methods=["POST"]), Route("/api/version", version)])


def test_an_unforeseen_failure_is_an_envelope_counted_logged_and_released(caplog):
    caplog.set_level(logging.INFO, logger="vilms")
    with ThreadedServer(ragged_embedder()) as engine, gateway(ollama_config(engine.url)) as gw:
        before = {s: counted(gw.url, s, model="nomic-embed-text", route="embeddings") for s in ("500", "502")}
        response = httpx.post(gw.url + "/v1/embeddings", json={"model": "nomic-embed-text", "input": ["a", "b"]})
        error = assert_envelope(response, response.status_code)
        assert response.status_code in (500, 502) and "0.1" not in error["message"]
        after = counted(gw.url, str(response.status_code), model="nomic-embed-text", route="embeddings")
        assert after == before[str(response.status_code)] + 1
        assert running_gauge(gw.url) == 0
    if response.status_code == 500:
        logged = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == response.headers["x-request-id"]]
        assert any(r.exc_info for r in logged) and "Traceback" in caplog.text   # the error log, with traceback
        assert any(r.name == "vilms.access" and r.fields["status"] == 500 for r in logged)  # and the access log


def test_embedding_dimensions_true_is_400(ollama_standin):
    with gateway(ollama_config(ollama_standin.url)) as gw:
        for bad in ({"dimensions": True}, {"encoding_format": "hex"}, {"input": [1.5]}):
            body = {"model": "nomic-embed-text", "input": "hi", **bad}
            assert_envelope(httpx.post(gw.url + "/v1/embeddings", json=body), 400)
    assert ollama_standin.state["requests"] == []


def test_the_validated_body_is_what_reaches_the_engine(backend):
    with gateway(openai_config(backend.url)) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [user("hi")], "stream": False, "temperature": 1,
            "stop": "a stop string longer than sixteen characters", "seed": 3, "tool_choice": "auto",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
        assert response.status_code == 200, response.text
    sent = backend.backend.last_request
    assert sent["stream"] is False and sent["model"] == "mock" and sent["stop"].startswith("a stop")
    assert sent["response_format"]["json_schema"]["schema"] == {"type": "object"}


# --- malformed upstream lines -----------------------------------------------------------------------------------

def broken_ollama(lines: list[bytes]) -> Starlette:
    async def chat(request: Request) -> Response:
        async def body():
            for line in lines:
                yield line
        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def version(request: Request) -> Response:
        return Response(b'{"version":"x"}', media_type="application/json")

    return Starlette(routes=[Route("/api/chat", chat, methods=["POST"]), Route("/api/version", version)])


GOOD_LINE = b'{"message":{"role":"assistant","content":"one "},"done":false}\n'


@pytest.mark.parametrize("bad", [b"[1, 2]\n", b'{"message": "text"}\n', b'{"message": {"content": 5}}\n', b"not json\n",
                                 b'"just a string"\n', b'{"done": true, "eval_count": "many"}\n'])
def test_malformed_ndjson_line_is_an_sse_error_and_counted_as_failed(bad):
    with ThreadedServer(broken_ollama([GOOD_LINE, bad, GOOD_LINE])) as engine:
        with gateway(ollama_config(engine.url)) as gw:
            before_502, before_200 = counted(gw.url, "502"), counted(gw.url, "200")
            with httpx.stream("POST", gw.url + "/v1/chat/completions",
                              json={"model": "VLM", "stream": True, "messages": [user("hi")]}) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "one "
            error = orjson.loads(events[-1])["error"]
            assert error["type"] == "upstream_error" and error["code"] == "engine_error"
            assert counted(gw.url, "502") == before_502 + 1 and counted(gw.url, "200") == before_200
            assert running_gauge(gw.url) == 0
