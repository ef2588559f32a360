"""Chat through the gateway to Ollama's native API (stand-in), validated with openai and ollama types."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support import gateway


def jetson_config(url: str) -> dict:
    return {
        "host": {"platform": "js"},
        "serving": {
            "engine": "vllm",  # on Jetson, rule 2 still sends chat to Ollama
            "ollama-base-url": url,
            "models": [
                {"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM", "VLM_SMALL"],
                 "params": {"max-tokens": 5, "num-ctx": 4096, "keep-alive": "30m", "temperature": 0.2, "stop": ["zulu"]}},
                {"name": "llama3.2:1b", "type": "llm", "aliases": ["LLM"], "engine": "vllm"},
                {"name": "fail-midstream", "type": "llm"},
            ],
        },
    }


@pytest.fixture()
def gw(ollama_standin):
    with gateway(jetson_config(ollama_standin.url)) as server:
        yield server


def last_chat(standin) -> dict:
    return [body for kind, body in standin.state["requests"] if kind == "chat"][-1]


def test_standin_speaks_ollamas_protocol(ollama_standin):
    """The stand-in's replies satisfy the official ollama client's response types."""
    client = ollama.Client(host=ollama_standin.url)
    reply = client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert isinstance(reply, ollama.ChatResponse) and reply.done and reply.eval_count == 3
    parts = list(client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], stream=True,
                             options={"num_predict": 2}))
    assert parts[-1].done and parts[-1].done_reason == "length"
    assert isinstance(client.embed(model="nomic-embed-text", input=["a", "b"]), ollama.EmbedResponse)
    assert isinstance(client.list(), ollama.ListResponse)


def test_params_become_ollama_options_and_request_values_win(gw, ollama_standin):
    raw = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "VLM_SMALL", "messages": [{"role": "user", "content": "describe"}], "temperature": 0.9,
        "top_p": 0.5, "seed": 7,  # tools with response_format: a 400 on Ollama (test_api_ollama_tools)
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}).json()
    sent = last_chat(ollama_standin)
    assert sent["model"] == "qwen2.5vl:3b" and sent["stream"] is False
    assert sent["options"] == {"temperature": 0.9, "top_p": 0.5, "seed": 7, "num_ctx": 4096, "num_predict": 5,
                               "stop": ["zulu"]}
    assert sent["keep_alive"] == "30m"
    assert sent["tools"][0]["function"]["name"] == "weather"
    completion = ChatCompletion.model_validate(raw)
    assert completion.choices[0].finish_reason == "tool_calls"
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Hanoi"}


def test_jetson_rule_overrides_per_model_engine(gw, ollama_standin):
    completion = openai.OpenAI(base_url=gw.url + "/v1", api_key="x").chat.completions.create(
        model="LLM", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert last_chat(ollama_standin)["model"] == "llama3.2:1b"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4 and completion.usage.prompt_tokens > 0


def test_stream_translated_chunk_by_chunk_with_usage(gw, ollama_standin):
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={
            "model": "VLM", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5  # one chunk per Ollama line, none coalesced
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1


def test_official_client_stream_without_usage(gw):
    stream = openai.OpenAI(base_url=gw.url + "/v1", api_key="x").chat.completions.create(
        model="VLM", stream=True, messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence_gives_stop_finish_reason(gw, ollama_standin):
    # The stand-in's canned words are deterministic; stop on the first one it would say.
    first = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "VLM", "messages": [{"role": "user", "content": "q"}], "max_tokens": 1}).json()
    word = first["choices"][0]["message"]["content"].strip()
    raw = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "VLM", "messages": [{"role": "user", "content": "q"}], "stop": [word]}).json()
    assert raw["choices"][0]["finish_reason"] == "stop"


def test_midstream_error_becomes_sse_error_event_and_gateway_survives(gw):
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={
            "model": "fail-midstream", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "error" in events[-1] and "out of memory" in events[-1]["error"]["message"]
    assert events[-1]["error"]["type"] == "upstream_error"
    assert httpx.get(gw.url + "/health_check").json() == {"status": "ok"}


def test_n_greater_than_one_is_refused_for_ollama(gw):
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "VLM", "n": 2,
                                                           "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
