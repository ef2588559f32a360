"""API keys (contract C2): 401/403 envelopes, per-key scope and limits, keys never leaked; the exposure rule."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest
import yaml

from tests.support import gateway, mock_backend
from tests.serve.test_hardening import assert_envelope, user
from tests.serve.test_hardening_limits import wait_until
from vilms.config.load import build_config
from vilms.config.keys import exposure_issues

ALICE = "sk-alice-0123456789abcdef-ALICE"
BOB = "sk-bob-0123456789abcdef-BOB"
CAROL = "sk-carol-0123456789abcdef-CAROL"
CHAT = "/v1/chat/completions"


def keyed_config(url: str, keys: list[dict], **gateway_settings) -> dict:
    return {"serving": {"engine": "openai", "base-url": url, "models": [
        {"name": "mock", "aliases": ["LLM"]}, {"name": "other", "aliases": ["OTHER"]}]},
        "gateway": {"api-keys": keys, **gateway_settings}}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture()
def backend():
    with mock_backend(tokens=2) as server:
        yield server


@pytest.fixture()
def keyed(backend):
    keys = [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB, "models": ["OTHER"]}]
    with gateway(keyed_config(backend.url, keys)) as gw:
        yield gw


def ask(gw, key: str | None = None, model: str = "LLM", **headers) -> httpx.Response:
    return httpx.post(gw.url + CHAT, headers={**(bearer(key) if key else {}), **headers},
                      json={"model": model, "messages": [user("hi")]})


def test_every_v1_route_needs_a_valid_key(keyed, backend):
    for path, body in ((CHAT, {"model": "LLM", "messages": [user("hi")]}), ("/v1/embeddings", {"model": "e", "input": "x"})):
        for headers in ({}, bearer("sk-wrong-0123456789abcdef"), {"authorization": ALICE},
                        {"authorization": f"Basic {ALICE}"}, bearer(ALICE + "x"), bearer(ALICE[:-1])):
            error = assert_envelope(httpx.post(keyed.url + path, json=body, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
    assert assert_envelope(httpx.get(keyed.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert backend.backend.stats["requests"] == 0
    assert ask(keyed, ALICE).status_code == 200
    assert assert_envelope(ask(keyed, ALICE, **{"content-type": "text/plain"}), 415)["code"] == "unsupported_media_type"


def test_a_key_for_another_model_is_403_and_sees_only_its_models(keyed, backend):
    error = assert_envelope(ask(keyed, BOB, model="LLM"), 403)
    assert error["code"] == "model_not_allowed" and error["param"] == "model"
    assert ask(keyed, BOB, model="OTHER").status_code == 200
    assert ask(keyed, BOB, model="other").status_code == 200
    ids = {m["id"] for m in httpx.get(keyed.url + "/v1/models", headers=bearer(BOB)).json()["data"]}
    assert ids == {"other", "OTHER"}
    ids = {m["id"] for m in httpx.get(keyed.url + "/v1/models", headers=bearer(ALICE)).json()["data"]}
    assert ids == {"mock", "LLM", "other", "OTHER"}


def test_health_open_metrics_and_readiness_details_need_a_key(keyed):
    assert httpx.get(keyed.url + "/health_check").json() == {"status": "ok"}
    assert_envelope(httpx.get(keyed.url + "/metrics"), 401)
    assert httpx.get(keyed.url + "/metrics", headers=bearer(ALICE)).status_code == 200
    assert_envelope(httpx.get(keyed.url + "/metrics", headers=bearer(BOB)), 403)  # scoped: not every model's labels
    anonymous = httpx.get(keyed.url + "/health/ready")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    detailed = httpx.get(keyed.url + "/health/ready", headers=bearer(ALICE)).json()
    assert detailed["status"] == "ready" and detailed["backends"]


def test_keys_never_appear_in_logs_metrics_or_errors(backend, caplog):
    caplog.set_level(logging.INFO, logger="vilms")
    keys = [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB, "models": ["OTHER"]}]
    with gateway(keyed_config(backend.url, keys)) as gw:
        bodies = [ask(gw, ALICE).text, ask(gw, BOB).text, ask(gw, "sk-wrong-0123456789abcdef").text,
                  ask(gw, ALICE, model="nope").text, ask(gw, BOB, model="LLM").text]
        metrics = httpx.get(gw.url + "/metrics", headers=bearer(ALICE)).text
        ready = httpx.get(gw.url + "/health/ready", headers=bearer(ALICE)).text
    for secret in (ALICE, BOB, ALICE[:12], "0123456789abcdef", "sk-wrong"):
        assert secret not in caplog.text and secret not in metrics and secret not in ready
        assert not any(secret in body for body in bodies)
    access = [r for r in caplog.records if r.name == "vilms.access"]
    assert {getattr(r, "fields", {}).get("key") for r in access} >= {"alice", "bob"}
    assert {getattr(r, "fields", {}).get("status") for r in access} >= {200, 401, 403, 404}


def test_requests_per_minute_and_concurrency_per_key():
    with mock_backend(tokens=10, token_delay_ms=100) as slow:
        keys = [{"name": "metered", "key": ALICE, "requests-per-minute": 2},
                {"name": "narrow", "key": BOB, "max-concurrency": 1}, {"name": "free", "key": CAROL}]
        with gateway(keyed_config(slow.url, keys)) as gw:
            assert ask(gw, ALICE).status_code == 200 and ask(gw, ALICE).status_code == 200
            limited = ask(gw, ALICE)
            assert assert_envelope(limited, 429)["code"] == "rate_limit_exceeded"
            assert int(limited.headers["retry-after"]) >= 1
            assert ask(gw, CAROL).status_code == 200  # another key is not affected

            done: list[int] = []
            holder = threading.Thread(target=lambda: done.append(httpx.post(
                gw.url + CHAT, headers=bearer(BOB), timeout=30,
                json={"model": "LLM", "stream": True, "messages": [user("hi")]}).status_code))
            before = slow.backend.stats["requests"]
            holder.start()
            wait_until(lambda: slow.backend.stats["requests"] > before)
            assert assert_envelope(ask(gw, BOB), 429)["code"] == "concurrency_limit_exceeded"
            holder.join()
            assert done == [200] and ask(gw, BOB).status_code == 200


def test_keys_file_is_merged_and_anonymous_can_be_allowed(backend, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"name": "from-file", "key": CAROL, "models": ["mock"]}]))
    keys_file.chmod(0o600)
    config = keyed_config(backend.url, [{"name": "alice", "key": ALICE}], **{"api-keys-file": str(keys_file)})
    with gateway(config) as gw:
        assert ask(gw, CAROL).status_code == 200 and ask(gw, ALICE).status_code == 200
        assert ask(gw, CAROL, model="OTHER").status_code == 403
        assert ask(gw).status_code == 401
    config["gateway"]["allow-anonymous"] = True
    with gateway(config) as gw:
        assert ask(gw).status_code == 200               # no key: served
        assert ask(gw, "unused").status_code == 200     # the openai client always sends some key: anonymous
        assert ask(gw, CAROL, model="OTHER").status_code == 403  # a known key keeps its scope


def test_exposure_rule_for_render():
    def issues(gateway: dict, bind: str | None = None) -> list:
        return exposure_issues(build_config({"serving": {"models": [{"name": "m"}]}, "gateway": gateway}), bind)

    assert [i.pointer for i in issues({})] == ["/gateway"]                   # 0.0.0.0, no keys
    assert issues({"host": "127.0.0.1"}) == [] and issues({"host": "::1"}) == []
    assert issues({}, bind="127.0.0.1") == [] and len(issues({"host": "127.0.0.1"}, bind="0.0.0.0")) == 1
    assert issues({"allow-anonymous": True}) == []
    assert issues({"api-keys": [{"name": "a", "key": ALICE}]}) == []
    assert issues({"api-keys-file": "/etc/vilms/keys.yaml"}) == []
    message = issues({})[0].render()
    assert "allow-anonymous" in message and "api-keys" in message


def test_short_keys_are_refused_by_the_schema():
    from vilms.config.model import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config({"serving": {"models": [{"name": "m"}]}, "gateway": {"api-keys": [{"name": "a", "key": "short"}]}})
    assert "/gateway/api-keys/0/key" in str(info.value) and "short" not in str(info.value)


def test_any_other_v1_route_needs_a_key_too(keyed):
    """Secure by default: a /v1/* path the gateway does not (yet) serve answers 401 to a stranger, 404 to a key."""
    for method in ("GET", "POST", "PUT"):
        assert assert_envelope(httpx.request(method, keyed.url + "/v1/not-yet-a-route"), 401)["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/v1/not-yet-a-route", headers=bearer(ALICE)).status_code == 404
    assert httpx.get(keyed.url + "/nothing-here").status_code == 404


@pytest.mark.parametrize("content", [
    "- {name: a, key: sk-short}", "- {name: a, key: sk-0123456789abcdef-A, max-concurrency: many}",
    "just text", "- {name: a, key: sk-0123456789abcdef-A, extra: 1}", "{{{"])
def test_a_bad_keys_file_stops_the_gateway_without_echoing_it(backend, tmp_path, content):
    from vilms.serve.api import create_app
    from vilms.config.model import ConfigError

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(content)
    with pytest.raises(ConfigError) as info:
        create_app(build_config(keyed_config(backend.url, [], **{"api-keys-file": str(keys_file)})))
    assert "sk-" not in str(info.value) and "many" not in str(info.value) and "api-keys-file" in str(info.value)
