"""Issue #15, continued: operator caps reach the engine, fair sharing between backends, body and stream
deadlines, the in-flight body budget, and HTTP hygiene. Real servers on loopback, stand-in engines."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import orjson
import pytest

from tests.support import ThreadedServer, gateway, mock_backend
from tests.serve.test_hardening import assert_envelope, counted, running_gauge, user

CHAT = "/v1/chat/completions"


def two_models(url: str, **gateway_settings) -> dict:
    return {"serving": {"engine": "vllm", "models": [
        {"name": "capped", "engine": "vllm", "base-url": url, "params": {"max-tokens-cap": 100, "max-n": 2}},
        {"name": "extras", "engine": "vllm", "base-url": url,
         "params": {"max-tokens-cap": 100, "request-fields": ["ignore_eos", "min_tokens"]}}]},
        "gateway": gateway_settings}


@pytest.fixture()
def backend():
    with mock_backend(tokens=2) as server:
        yield server


# --- operator caps -----------------------------------------------------------------------------------------------

def test_caps_reach_the_engine_as_configured(backend):
    with gateway(two_models(backend.url)) as gw:
        def ask(model: str, **fields) -> httpx.Response:
            return httpx.post(gw.url + CHAT, json={"model": model, "messages": [user("hi")], **fields})

        assert ask("capped", max_tokens=10**9, max_completion_tokens=10**9).status_code == 200
        sent = backend.backend.last_request
        assert sent["max_tokens"] == 100 and sent["max_completion_tokens"] == 100   # clamped
        assert ask("capped", max_tokens=7, n=2).status_code == 200
        assert backend.backend.last_request["max_tokens"] == 7 and backend.backend.last_request["n"] == 2
        assert ask("capped").status_code == 200
        assert "max_tokens" not in backend.backend.last_request  # absent stays absent: vLLM bounds it by context
        requests_before = backend.backend.stats["requests"]
        assert assert_envelope(ask("capped", n=128), 400)["param"] == "n"
        for field, value in (("ignore_eos", True), ("min_tokens", 10**6), ("best_of", 64), ("num_ctx", 131072),
                             ("keep_alive", -1)):
            error = assert_envelope(ask("capped", **{field: value}), 400)
            assert error["param"] == field
            assert error["code"] == ("operator_only_parameter" if field in ("num_ctx", "keep_alive")
                                     else "unsupported_parameter")
        assert backend.backend.stats["requests"] == requests_before  # nothing refused reached the engine
        assert ask("extras", ignore_eos=True, min_tokens=10**6).status_code == 200
        sent = backend.backend.last_request
        assert sent["ignore_eos"] is True and sent["min_tokens"] == 100
        assert_envelope(ask("extras", num_ctx=8), 400)


def test_ollama_always_gets_a_bound_and_operator_only_options(ollama_standin):
    config = {"host": {"platform": "js"}, "gateway": {"max-tokens-cap": 50},
              "serving": {"engine": "ollama", "ollama-base-url": ollama_standin.url, "models": [
                  {"name": "llama3.2:1b", "params": {"num-ctx": 2048, "keep-alive": "5m"}}]}}
    with gateway(config) as gw:
        for fields, predict in (({}, 50), ({"max_tokens": 10**9}, 50), ({"max_completion_tokens": 9}, 9)):
            response = httpx.post(gw.url + CHAT, json={"model": "llama3.2:1b", "messages": [user("hi")], **fields})
            assert response.status_code == 200, response.text
            sent = [body for kind, body in ollama_standin.state["requests"] if kind == "chat"][-1]
            assert sent["options"]["num_predict"] == predict
            assert sent["options"]["num_ctx"] == 2048 and sent["keep_alive"] == "5m"
        for field in ("num_ctx", "keep_alive", "options"):
            assert_envelope(httpx.post(gw.url + CHAT, json={"model": "llama3.2:1b", "messages": [user("hi")],
                                                             field: 1}), 400)


# --- fair sharing ------------------------------------------------------------------------------------------------

def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_saturated_backend_gets_429_while_the_other_backend_answers():
    with mock_backend(tokens=20, token_delay_ms=100) as slow, mock_backend(tokens=2) as fast:
        config = {"serving": {"engine": "openai", "models": [
            {"name": "a", "engine": "openai", "base-url": slow.url},
            {"name": "b", "engine": "openai", "base-url": fast.url}]},
            "gateway": {"backend-concurrency": 2, "backend-queue": 0}}
        with gateway(config) as gw:
            results: list[int] = []

            def stream_a() -> None:
                with httpx.stream("POST", gw.url + CHAT, timeout=30,
                                  json={"model": "a", "stream": True, "messages": [user("hi")]}) as r:
                    r.read()
                    results.append(r.status_code)

            holders = [threading.Thread(target=stream_a) for _ in range(2)]
            for t in holders:
                t.start()
            wait_until(lambda: slow.backend.stats["requests"] == 2)
            over = httpx.post(gw.url + CHAT, json={"model": "a", "messages": [user("hi")]})
            assert assert_envelope(over, 429)["code"] == "backend_at_capacity"
            assert int(over.headers["retry-after"]) >= 1
            other = httpx.post(gw.url + CHAT, json={"model": "b", "messages": [user("hi")]})
            assert other.status_code == 200
            for t in holders:
                t.join()
            assert results == [200, 200] and slow.backend.stats["requests"] == 2
            assert running_gauge(gw.url) == 0


def test_queued_request_is_served_when_a_slot_frees():
    with mock_backend(tokens=2, latency_ms=300) as slow:
        config = {"serving": {"engine": "openai", "base-url": slow.url, "models": [{"name": "a"}]},
                  "gateway": {"backend-concurrency": 1, "backend-queue": 4}}
        with gateway(config) as gw:
            statuses: list[int] = []

            def ask() -> None:
                statuses.append(httpx.post(gw.url + CHAT, timeout=30,
                                           json={"model": "a", "messages": [user("hi")]}).status_code)

            threads = [threading.Thread(target=ask) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses == [200, 200, 200]


def test_waiting_for_a_pool_connection_is_not_a_connect_failure():
    """One pooled connection, a 2 s backend, a 0.5 s connect timeout: the second request waits, then succeeds."""
    with mock_backend(tokens=2, latency_ms=2000) as slow:
        config = {"serving": {"engine": "openai", "base-url": slow.url, "models": [{"name": "a"}]},
                  "gateway": {"max-connections": 1, "connect-timeout": 0.5}}
        with gateway(config) as gw:
            statuses: list[int] = []

            def ask() -> None:
                statuses.append(httpx.post(gw.url + CHAT, timeout=30,
                                           json={"model": "a", "messages": [user("hi")]}).status_code)

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses == [200, 200]


# --- deadlines and the body budget -------------------------------------------------------------------------------

def raw_request(port: int, head_length: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % head_length + sent)
    return sock


def read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_slow_body_gets_408_after_the_body_deadline(backend):
    with gateway({"serving": {"engine": "openai", "base-url": backend.url, "models": [{"name": "a"}]},
                  "gateway": {"body-timeout": 0.3}}) as gw:
        sock = raw_request(gw.port, 1000, b'{"model": "a", ')
        try:
            assert read_status(sock) == 408
        finally:
            sock.close()
    assert backend.backend.stats["requests"] == 0


def held_body_bytes(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vilms:request_body_bytes_held "):
            return float(line.split()[1])
    return 0.0


def test_inflight_body_budget_refuses_with_503_then_recovers(backend):
    with gateway({"serving": {"engine": "openai", "base-url": backend.url, "models": [{"name": "a"}]},
                  "gateway": {"max-inflight-body-bytes": 50_000}}) as gw:
        body = orjson.dumps({"model": "a", "messages": [user("x" * 39_000)]})
        holder = raw_request(gw.port, len(body), body[:-100])  # bytes are charged as they arrive
        try:
            wait_until(lambda: held_body_bytes(gw.url) >= len(body) - 100)
            refused = httpx.post(gw.url + CHAT, content=body, headers={"content-type": "application/json"})
            assert assert_envelope(refused, 503)["code"] == "overloaded" and refused.headers["retry-after"]
            holder.sendall(body[-100:])
            assert read_status(holder) == 200
        finally:
            holder.close()
        assert httpx.post(gw.url + CHAT, content=body, headers={"content-type": "application/json"}).status_code == 200
        wait_until(lambda: held_body_bytes(gw.url) == 0)


def test_stream_deadline_ends_a_long_stream_with_an_error_event():
    with mock_backend(tokens=50, token_delay_ms=50) as slow:
        with gateway({"serving": {"engine": "openai", "base-url": slow.url, "models": [{"name": "a"}]},
                      "gateway": {"stream-timeout": 0.5}}) as gw:
            with httpx.stream("POST", gw.url + CHAT, timeout=30,
                              json={"model": "a", "stream": True, "messages": [user("hi")]}) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert orjson.loads(events[-1])["error"]["code"] == "stream_timeout"
            assert len(events) < 30
            assert counted(gw.url, "504", model="a") >= 1 and running_gauge(gw.url) == 0


# --- hygiene -----------------------------------------------------------------------------------------------------

def test_post_routes_need_application_json(backend):
    with gateway({"serving": {"engine": "openai", "base-url": backend.url, "models": [{"name": "a"}]}}) as gw:
        body = orjson.dumps({"model": "a", "messages": [user("hi")]})
        for headers in ({"content-type": "text/plain"}, {}, {"content-type": "application/x-www-form-urlencoded"},
                        {"content-type": "multipart/form-data; boundary=x"}):
            for path in (CHAT, "/v1/embeddings"):
                assert_envelope(httpx.post(gw.url + path, content=body, headers=headers), 415)
        ok = httpx.post(gw.url + CHAT, content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
    assert backend.backend.stats["requests"] == 1


def test_request_id_kept_only_when_short_and_plain(backend):
    with gateway({"serving": {"engine": "openai", "base-url": backend.url, "models": [{"name": "a"}]}}) as gw:
        def rid(value: str | bytes) -> str:
            return httpx.post(gw.url + CHAT, headers={"x-request-id": value},
                              json={"model": "a", "messages": [user("hi")]}).headers["x-request-id"]

        assert rid("req-42.a_b:c") == "req-42.a_b:c"
        for bad in ("x" * 65, "<script>alert(1)</script>", "a b", "ok\tno", "\u00e9t\u00e9".encode()):
            replaced = rid(bad)
            assert replaced != bad and len(replaced) <= 64 and replaced.isalnum()


def test_docs_off_by_default_and_405_always_names_allowed_methods(backend):
    base = {"serving": {"engine": "openai", "base-url": backend.url, "models": [{"name": "a"}]}}
    with gateway(base) as gw:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(gw.url + path).status_code == 404
        for method in ("TRACE", "PUT", "DELETE", "GET", "PATCH"):
            for path in (CHAT, "/v1/embeddings"):
                response = httpx.request(method, gw.url + path)
                assert assert_envelope(response, 405)["code"] == "method_not_allowed"
                assert response.headers["allow"] == "POST", (method, path)
        for path in ("/health_check", "/metrics", "/v1/models"):
            response = httpx.request("TRACE", gw.url + path)
            assert response.status_code == 405 and "GET" in response.headers["allow"]
    with gateway({**base, "gateway": {"openapi": True}}) as gw:
        assert httpx.get(gw.url + "/openapi.json").status_code == 200
        assert httpx.get(gw.url + "/docs").status_code == 200


def leaky_engine() -> object:
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        message = (b'{"error": {"message": "cannot reach vllm-x:8000 or [fe80::1%eth0]:8000 or fd00::7; '
                   b'weights /models/secret-org/model.safetensors missing (http://10.1.2.3:8000/x)"}}')
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": message})
    return app


def test_engine_errors_are_scrubbed_of_hosts_addresses_and_paths():
    with ThreadedServer(leaky_engine()) as engine:
        with gateway({"serving": {"engine": "openai", "base-url": engine.url, "models": [{"name": "a"}]}}) as gw:
            error = assert_envelope(httpx.post(gw.url + CHAT, json={"model": "a", "messages": [user("hi")]}), 502)
    for secret in ("vllm-x", "8000", "fe80", "fd00", "/models", "secret-org", "safetensors", "10.1.2.3"):
        assert secret not in error["message"], error["message"]
    assert "missing" in error["message"]


def test_backend_limiter_never_leaks_a_slot_when_waiters_give_up():
    """Cancelled and timed-out waiters leave the slot count exact (a leak would shrink the backend for good)."""
    import asyncio

    from vilms.serve.admission import BackendLimiter
    from vilms.serve.security import RateLimited

    async def scenario() -> None:
        limiter = BackendLimiter("b", limit=1, queue=2, timeout=0.2)
        await limiter.acquire()                        # A holds the only slot
        waiter = asyncio.ensure_future(limiter.acquire())  # B queues ...
        await asyncio.sleep(0)
        waiter.cancel()                                # ... and its client goes away
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(RateLimited):               # C waits past the queue timeout: 429
            await limiter.acquire()
        limiter.release()                              # A done
        assert limiter.active == 0 and not limiter.waiting
        await limiter.acquire()                        # D gets the slot at once
        handed = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)
        limiter.release()                              # D done: the slot goes to E, not back to the pool
        await handed
        assert limiter.active == 1
        limiter.release()
        assert limiter.active == 0

    asyncio.run(scenario())
