"""The seed project's own config.yaml (copy beside this file, as its users have it) validates, renders and serves.

Before (issue #22), `vilms validate` rejected it three ways: `host.cuda-version` and per-model `params: - stream:`
were unknown keys, and the four aliases pointing at `Qwen/Qwen3-Embedding-4B` (a model it does not list) were
errors. Its `base-url: http://vilms-ollama:11434/v1/chat/completions` would also have sent every chat to
`.../v1/chat/completions/api/chat`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ThreadedServer, gateway
from vilms.cli import main
from vilms.config.load import build_config
from vilms.config.model import ConfigError
from vilms.config.routing import Router
from vilms.deploy.plan import render

FIXTURE = Path(__file__).with_name("seed-project-config.yaml")
DANGLING = ["qwen3-embedding-4b", "qwen3-embbeding-4b", "Qwen3-Embedding-4B", "Qwen3-Embbeding-4B"]
CHAT_MODELS = ["qwen3:4b-instruct", "qwen3-vl:4b-instruct", "qwen2.5:3b", "qwen2.5vl:3b"]


def seed() -> dict:
    return yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))


def test_vilms_validate_exits_0_on_the_seed_config_and_names_every_warning(capsys):
    assert main(["validate", str(FIXTURE), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["errors"] == []
    pointers = {w["pointer"] for w in report["warnings"]}
    assert {f"/model-aliases/{a}" for a in DANGLING} <= pointers
    assert {"/host/cuda-version", "/docker/docker-registry", "/docker/docker-project"} <= pointers
    assert all(w["severity"] == "warning" for w in report["warnings"])


def test_text_output_prints_the_dangling_alias_with_its_pointer(capsys):
    assert main(["validate", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "warning: /model-aliases/Qwen3-Embedding-4B: alias 'Qwen3-Embedding-4B' points to " \
           "'Qwen/Qwen3-Embedding-4B', which this config does not serve" in out
    assert out.rstrip().endswith("valid")


def test_seed_endpoint_urls_mean_the_ollama_server():
    router = Router(build_config(seed()))
    for name in CHAT_MODELS:
        assert router.resolve(name).engine == "ollama"
        assert router.resolve(name).base_urls == ("http://vilms-ollama:11434",)


def test_render_runs_vilms_ollama_and_the_gateway_reaches_it_at_the_seeds_url():
    """As written, render refuses only for the exposure rule (anonymous on 0.0.0.0, which validate warns about);
    with the one line that rule asks for, the compose file runs `vilms-ollama` and the gateway's config names it."""
    with pytest.raises(ConfigError) as refused:
        render(seed())
    assert [i.pointer for i in refused.value.issues] == ["/gateway"]
    data = seed()
    data["gateway"] = {"allow-anonymous": True}
    result = render(data, gpu=False)
    compose = yaml.safe_load(result.files["docker-compose.yaml"])
    assert "vilms-ollama" in compose["services"] and "gateway" in compose["services"]
    assert compose["services"]["vilms-ollama"]["image"].startswith("docker-registry.viais.vision/ollama/ollama:latest")
    written = yaml.safe_load(result.files["config.yaml"])
    assert written["serving"]["ollama-base-url"] == "http://vilms-ollama:11434/v1/chat/completions"
    served = Router(build_config(written))
    assert {served.resolve(m).base_urls for m in CHAT_MODELS} == {("http://vilms-ollama:11434",)}
    assert set(result.plan["ollama_pulls"][0]["models"]) == set(CHAT_MODELS)
    assert result.plan["project"] == "vilms"


@pytest.fixture()
def seed_gateway():
    """The seed config served against an Ollama stand-in that holds its four chat models (embeddings lazy: the
    e5 weights are not on this machine, and /v1/models does not load them)."""
    from devkit.ollama_standin import create_app

    standin = create_app(CHAT_MODELS, token_delay_ms=0)
    with ThreadedServer(standin) as engine:
        data = seed()
        data["serving"]["ollama-base-url"] = engine.url + "/v1/chat/completions"  # the seed's URL form
        data["embedding"]["load"] = "lazy"
        with gateway(data) as gw:
            gw.standin = standin.state.standin
            yield gw, data


def test_v1_models_lists_every_resolving_seed_alias_and_no_dangling_one(seed_gateway):
    gw, data = seed_gateway
    ids = {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    resolving = {a for a, target in data["model-aliases"].items() if target != "Qwen/Qwen3-Embedding-4B"}
    assert resolving | set(CHAT_MODELS) | {"intfloat/multilingual-e5-small"} <= ids
    assert not ids & set(DANGLING)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/embeddings", {"input": "xin chao"}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/responses", {"input": "hi"}),
])
def test_a_dangling_alias_gets_the_same_404_as_an_unknown_model(seed_gateway, path, body):
    gw, _ = seed_gateway
    dangling = httpx.post(gw.url + path, json={**body, "model": "Qwen3-Embedding-4B"})
    unknown = httpx.post(gw.url + path, json={**body, "model": "no-such-model"})
    assert dangling.status_code == unknown.status_code == 404
    assert dangling.json()["error"]["code"] == "model_not_found"
    same = dangling.json()["error"]["message"].replace("Qwen3-Embedding-4B", "X")
    assert same == unknown.json()["error"]["message"].replace("no-such-model", "X")
    assert {**dangling.json()["error"], "message": ""} == {**unknown.json()["error"], "message": ""}
    assert httpx.get(gw.url + "/v1/models/Qwen3-Embedding-4B").status_code == 404


def test_seed_stream_false_changes_nothing_and_the_request_decides(seed_gateway):
    gw, _ = seed_gateway
    message = [{"role": "user", "content": "hi"}]
    plain = httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM", "messages": message, "max_tokens": 3})
    assert plain.headers["content-type"].startswith("application/json") and plain.json()["object"] == "chat.completion"
    streamed = httpx.post(gw.url + "/v1/chat/completions",
                          json={"model": "LLM", "messages": message, "max_tokens": 3, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream") and "data: [DONE]" in streamed.text
    assert gw.standin["requests"][-1][1]["stream"] is True


def test_a_per_model_stream_true_only_fills_in_for_requests_that_leave_stream_out():
    """params.stream: true (validate warns) streams a request without `stream`; one saying false gets JSON."""
    from devkit.ollama_standin import create_app

    standin = create_app(CHAT_MODELS, token_delay_ms=0)
    with ThreadedServer(standin) as engine:
        data = seed()
        data["serving"]["ollama-base-url"] = engine.url
        data["embedding"]["enabled"] = False
        small = data["serving"]["models"][2]
        small["params"] = [p if "stream" not in p else {"stream": True} for p in small["params"]]
        with gateway(data) as gw:
            message = [{"role": "user", "content": "hi"}]
            default = httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM_SMALL", "messages": message})
            assert default.headers["content-type"].startswith("text/event-stream") and "data: [DONE]" in default.text
            said = httpx.post(gw.url + "/v1/chat/completions",
                              json={"model": "LLM_SMALL", "messages": message, "stream": False})
            assert said.json()["object"] == "chat.completion"
            legacy = httpx.post(gw.url + "/v1/completions", json={"model": "LLM_SMALL", "prompt": "hi", "max_tokens": 2})
            assert legacy.headers["content-type"].startswith("text/event-stream")
            responses = httpx.post(gw.url + "/v1/responses", json={"model": "LLM_SMALL", "input": "hi"})
            assert responses.headers["content-type"].startswith("text/event-stream")
            assert "response.completed" in responses.text
            other = httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM_QWEN3", "messages": message})
            assert other.json()["object"] == "chat.completion"  # the default is per model


def test_clashes_and_loops_in_the_seed_aliases_stay_errors():
    clash = seed()
    clash["model-aliases"]["LLM_SMALL"] = "qwen3:4b-instruct"  # serving.models[2] says qwen2.5:3b
    loop = seed()
    loop["model-aliases"] |= {"Qwen/Qwen3-Embedding-4B": "qwen3-embedding-4b"}  # the dangling target, now a loop
    for data, words in ((clash, "different targets"), (loop, "alias loop")):
        with pytest.raises(ConfigError) as info:
            build_config(data)
        assert any(words in i.message for i in info.value.issues)
