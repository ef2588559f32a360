"""Error envelopes and status codes, streaming pass-through timing, disconnect cancellation, failover."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from devkit.mock_backend import MockBackend
from tests.support import ThreadedServer, free_port, gateway, mock_backend


def openai_config(*urls: str, **gateway_settings) -> dict:
    return {"serving": {"engine": "openai", "base-url": list(urls) if len(urls) > 1 else urls[0],
                        "models": [{"name": "mock", "aliases": ["LLM"]}]},
            "gateway": gateway_settings}


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture()
def slow_backend():
    with mock_backend(tokens=6, token_delay_ms=80) as server:
        yield server


@pytest.fixture()
def fast_backend():
    with mock_backend(tokens=4) as server:
        yield server


def test_bad_requests_get_400_envelopes(fast_backend):
    with gateway(openai_config(fast_backend.url)) as gw:
        url = gw.url + "/v1/chat/completions"
        json_type = {"content-type": "application/json"}
        assert assert_envelope(httpx.post(url, content=b"{nope", headers=json_type), 400)["code"] == "invalid_json"
        assert assert_envelope(httpx.post(url, content=b"[1]", headers=json_type), 400)["code"] == "invalid_json"
        assert assert_envelope(httpx.post(url, json={"model": "LLM"}), 400)["param"] == "messages"
        assert assert_envelope(httpx.post(url, json={"model": "LLM", "messages": []}), 400)["param"] == "messages"
        error = assert_envelope(httpx.post(url, json={"model": "LLM", "messages": [{"role": "wizard", "content": "x"}]}), 400)
        assert error["param"] == "messages[0].role"
        assert assert_envelope(httpx.post(url, json={"model": "LLM", "max_tokens": 0,
                                                     "messages": [{"role": "user", "content": "x"}]}), 400)["param"] == "max_tokens"
        assert fast_backend.backend.stats["requests"] == 0  # nothing bad reached the engine


def test_unknown_model_is_404_listing_valid_names(fast_backend):
    with gateway(openai_config(fast_backend.url)) as gw:
        error = assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
        assert error["code"] == "model_not_found" and "mock" in error["message"] and "LLM" in error["message"]


def test_get_on_post_routes_is_405_with_hint(fast_backend):
    with gateway(openai_config(fast_backend.url)) as gw:
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            response = httpx.get(gw.url + path)
            assert assert_envelope(response, 405)["message"].startswith(path)
            assert response.headers["allow"] == "POST"
        assert_envelope(httpx.get(gw.url + "/nope"), 404)


def test_unreachable_backend_is_503_and_ready_is_503(fast_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(openai_config(dead)) as gw:
        error = assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [{"role": "user", "content": "x"}]}), 503)
        assert "127.0.0.1" not in error["message"]
        assert httpx.get(gw.url + "/health/ready").status_code == 503
        assert httpx.get(gw.url + "/health_check").json() == {"status": "ok"}


def test_failover_to_alternate_url_only_on_connect_error(fast_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(openai_config(dead, fast_backend.url)) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 200 and fast_backend.backend.stats["requests"] == 1
        assert httpx.get(gw.url + "/health/ready").json()["status"] == "ready"


def test_backend_5xx_is_502_with_backend_message_and_no_urls():
    async def failing(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b'{"error":{"message":"CUDA out of memory at http://10.1.2.3:8000/internal"}}'
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    with ThreadedServer(failing) as backend, gateway(openai_config(backend.url)) as gw:
        error = assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json={
            "model": "LLM", "messages": [{"role": "user", "content": "x"}]}), 502)
        assert "CUDA out of memory" in error["message"] and "10.1.2.3" not in error["message"]


def test_backend_timeout_is_504():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with gateway(openai_config(url, **{"read-timeout": 0.3})) as gw:
            assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json={
                "model": "LLM", "messages": [{"role": "user", "content": "x"}]}, timeout=10), 504)
    finally:
        listener.close()


def test_stream_chunks_arrive_as_the_backend_makes_them(slow_backend):
    with gateway(openai_config(slow_backend.url)) as gw:
        arrivals = []
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json={
                "model": "LLM", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
            for chunk in response.iter_raw():
                arrivals.append((time.perf_counter(), chunk))
        # 1 role chunk + 6 tokens + finish + [DONE], 80 ms apart: the first must come long before the last.
        assert b"[DONE]" in arrivals[-1][1]
        assert arrivals[-1][0] - arrivals[0][0] > 0.5
        assert sum(c.count(b"data: ") for _, c in arrivals) == 9
        assert slow_backend.backend.stats["streams_completed"] == 1


def test_client_disconnect_cancels_upstream_stream(slow_backend):
    with gateway(openai_config(slow_backend.url)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json={
                "model": "LLM", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
            next(response.iter_raw())
        stats = slow_backend.backend.stats
        deadline = time.monotonic() + 5
        while stats["streams_abandoned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats["streams_abandoned"] == 1 and stats["streams_completed"] == 0


def test_client_disconnect_cancels_non_stream_request():
    backend = MockBackend(latency_ms=1500, tokens=2)
    with ThreadedServer(backend) as server, gateway(openai_config(server.url)) as gw:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json={
                "model": "LLM", "messages": [{"role": "user", "content": "x"}]}, timeout=0.3)
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(gw.url + "/metrics").text
            if 'vilms:requests_total{engine="openai",model="mock",route="chat",status="499"} 1.0' in text:
                break
            time.sleep(0.05)
        assert 'status="499"} 1.0' in text


def test_metrics_exposed_in_prometheus_format(fast_backend):
    with gateway(openai_config(fast_backend.url)) as gw:
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM", "stream": True,
                                                           "messages": [{"role": "user", "content": "x"}]})
        text = httpx.get(gw.url + "/metrics").text
        assert "vilms:time_to_first_token_seconds_count" in text
        assert "vilms:e2e_request_latency_seconds_bucket" in text
        assert "vilms:num_requests_running" in text
        assert "# TYPE vilms:upstream_errors_total counter" in text


def test_request_id_echoed(fast_backend):
    with gateway(openai_config(fast_backend.url)) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", headers={"x-request-id": "abc123"},
                              json={"model": "LLM", "messages": [{"role": "user", "content": "x"}]})
        assert response.headers["x-request-id"] == "abc123"


def test_oversized_body_is_413_and_never_reaches_the_engine(fast_backend):
    config = openai_config(fast_backend.url, **{"max-request-bytes": 4096})
    with gateway(config) as gw:
        big = {"model": "LLM", "messages": [{"role": "user", "content": "x" * 10_000}]}
        assert assert_envelope(httpx.post(gw.url + "/v1/chat/completions", json=big), 413)["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "LLM", "messages": [{"role": "user", "content": "'
            yield b"y" * 10_000
            yield b'"}]}'
        streamed = httpx.post(gw.url + "/v1/chat/completions", content=chunks(),  # no content-length: chunked
                              headers={"content-type": "application/json"})
        assert_envelope(streamed, 413)
    assert fast_backend.backend.stats["requests"] == 0
