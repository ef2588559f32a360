"""POST /v1/completions: Ollama's /api/generate (stand-in), pass-through to an OpenAI-compatible engine
(recording stand-in and the real llama.cpp server), checked with the openai client's Completion types."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types import Completion

from tests.support import ThreadedServer, gateway


@pytest.fixture()
def gw(ollama_standin):
    config = {"host": {"platform": "js"},
              "serving": {"ollama-base-url": ollama_standin.url,
                          "models": [{"name": "llama3.2:1b", "type": "llm", "aliases": ["LLM"],
                                      "params": {"max-tokens": 4, "temperature": 0.3}}]}}
    with gateway(config) as server:
        yield server


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def last(standin, kind: str = "generate") -> dict:
    return [body for k, body in standin.state["requests"] if k == kind][-1]


def test_ollama_completion_is_a_raw_generate(gw, ollama_standin):
    completion = client(gw).completions.create(model="LLM", prompt="Once upon a time", stop=["zulu"], seed=3)
    Completion.model_validate(completion.model_dump())
    sent = last(ollama_standin)
    assert sent["prompt"] == "Once upon a time" and sent["raw"] is True and sent["stream"] is False
    assert sent["options"] == {"temperature": 0.3, "seed": 3, "num_predict": 4, "stop": ["zulu"]}
    assert len(completion.choices[0].text.split()) == 4 and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4 and completion.model == "llama3.2:1b"


def test_ollama_stream_matches_the_non_streamed_text_and_carries_usage(gw):
    c = client(gw)
    whole = c.completions.create(model="LLM", prompt="abc").choices[0].text
    chunks = list(c.completions.create(model="LLM", prompt="abc", stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:  # the type wants a finish_reason; mid-stream chunks carry null, as OpenAI's and vLLM's do
        Completion.model_validate({**chunk.model_dump(), "choices": [
            {**c.model_dump(), "finish_reason": c.finish_reason or "stop"} for c in chunk.choices]})
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_ollama_logprobs_in_the_legacy_shape(gw, ollama_standin):
    completion = client(gw).completions.create(model="LLM", prompt="abc", logprobs=2, max_tokens=2)
    assert last(ollama_standin)["top_logprobs"] == 2
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.token_logprobs == [-0.25, -0.25] and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset == [0, len(logprobs.tokens[0])]


@pytest.mark.parametrize("body,param", [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"), ({"echo": True}, "echo"),
    ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 30}, "logprobs"),
])
def test_what_ollama_cannot_do_is_a_400_before_the_engine(gw, ollama_standin, body, param):
    r = httpx.post(gw.url + "/v1/completions", json={"model": "LLM", "prompt": "x", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert not ollama_standin.state["requests"]


def test_passthrough_renames_fills_defaults_and_relays_the_engines_bytes():
    from devkit.openai_standin import create_app

    app = create_app(["org/base"])
    with ThreadedServer(app) as engine:
        config = {"host": {"platform": "dgpu"},
                  "serving": {"engine": "vllm", "vllm-base-url": engine.url,
                              "models": [{"name": "org/base", "aliases": ["LLM"], "params": {"max-tokens": 3}}]}}
        with gateway(config) as gw:
            direct = httpx.post(engine.url + "/v1/completions", json={"model": "org/base", "prompt": [1, 2],
                                                                      "max_tokens": 3}).json()
            through = httpx.post(gw.url + "/v1/completions", json={"model": "LLM", "prompt": [1, 2]}).json()
            chunks = list(client(gw).completions.create(model="LLM", prompt="p", stream=True))
        path, sent, _ = app.state.standin["requests"][1]
    assert path == "/v1/completions" and sent == {"model": "org/base", "prompt": [1, 2], "max_tokens": 3}
    assert {**through, "created": 0} == {**direct, "created": 0}
    assert "".join(c.choices[0].text for c in chunks) == "alpha bravo charlie "


@pytest.mark.llama
def test_real_engine_completion(llama_url):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "openai", "base-url": llama_url + "/v1",
                          "models": [{"name": "tiny-llm", "aliases": ["LLM"]}]}}
    with gateway(config) as gw:
        completion = client(gw).completions.create(model="LLM", prompt="hello", max_tokens=3)
        assert completion.model == "tiny-llm" and completion.usage.completion_tokens <= 4
        chunks = list(client(gw).completions.create(model="LLM", prompt="hello", max_tokens=3, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
