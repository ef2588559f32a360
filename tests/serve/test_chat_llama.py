"""Chat through the gateway to the real llama.cpp engine, checked with the official openai client and types."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support import gateway

pytestmark = pytest.mark.llama


def config_for(llama_url: str, **params) -> dict:
    return {
        "host": {"platform": "dgpu"},
        "serving": {
            "engine": "openai",
            "base-url": llama_url + "/v1",
            "models": [{"name": "tiny-llm", "type": "llm", "aliases": ["LLM", "LLM_SMALL"],
                        "params": [{"max-tokens": 6}, *({k: v} for k, v in params.items())]}],
        },
        "model-aliases": {"DEFAULT": "LLM"},
    }


@pytest.fixture(scope="module")
def gw(llama_url):
    with gateway(config_for(llama_url, temperature=0.3)) as server:
        yield server


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_non_stream_through_alias_chain_is_a_valid_chat_completion(gw):
    raw = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "DEFAULT", "messages": [{"role": "user", "content": "hello"}]}, timeout=30).json()
    completion = ChatCompletion.model_validate(raw)
    assert completion.model == "tiny-llm"
    assert completion.choices[0].finish_reason == "length"  # max-tokens default 6 from params cut it
    assert 1 <= completion.usage.completion_tokens <= 7
    assert completion.choices[0].message.content


def test_request_max_tokens_wins_over_param_default(gw):
    completion = client(gw).chat.completions.create(model="LLM", max_tokens=2,
                                                    messages=[{"role": "user", "content": "hi"}])
    assert completion.usage.completion_tokens <= 3  # llama.cpp may count one over


def test_stream_with_official_client(gw):
    chunks = list(client(gw).chat.completions.create(model="LLM_SMALL", stream=True, max_tokens=5,
                                                     messages=[{"role": "user", "content": "count"}]))
    assert len(chunks) >= 3
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_unique_ids(gw):
    ids = {client(gw).chat.completions.create(model="LLM", max_tokens=1, messages=[{"role": "user", "content": "x"}]).id
           for _ in range(3)}
    assert len(ids) == 3


def test_models_lists_models_and_aliases(gw):
    data = httpx.get(gw.url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"tiny-llm", "LLM", "LLM_SMALL", "DEFAULT"}
    assert by_id["DEFAULT"]["alias_of"] == "tiny-llm"
    listed = client(gw).models.list()
    assert {m.id for m in listed} == set(by_id)


def test_vllm_standin_takes_vllms_command_line():
    """The rig's vLLM stand-in accepts compose's vLLM flags and serves the served-model-name, with /health."""
    import sys

    from tests.support import free_port, subprocess_server, tiny_gguf

    port = free_port()
    args = [sys.executable, "-m", "devkit.vllm_standin", "--model", "/models/qwen3-4b", "--served-model-name",
            "Qwen/Qwen3-4B", "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.45",
            "--enforce-eager"]
    with subprocess_server(args, "/health", port, env={"VILMS_STANDIN_GGUF": str(tiny_gguf())}) as url:
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["Qwen/Qwen3-4B"]
        completion = ChatCompletion.model_validate(httpx.post(url + "/v1/chat/completions", timeout=30, headers={
            "x-request-id": "gw-0000000001"}, json={  # the gateway forwards its request ids to vLLM
            "model": "Qwen/Qwen3-4B", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}).json())
        assert completion.choices[0].finish_reason == "length"
