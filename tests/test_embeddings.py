"""Embeddings: real MiniLM locally (shape, norms, semantics, base64, tokens, batching), and remote engines."""

from __future__ import annotations

import asyncio
import base64
import re
import time

import httpx
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from devkit.mock_backend import MockBackend
from tests.support import ThreadedServer, gateway, minilm_path

pytestmark = pytest.mark.embeddings

SENTENCES = [f"Sentence number {i} talks about {topic}." for i, topic in
             enumerate(["cats", "GPUs", "the weather", "Hanoi street food", "stock markets", "Jetson boards",
                        "football", "rain"] * 8)]


def emb_config(chat_url: str = "http://127.0.0.1:9", **embedding) -> dict:
    return {"serving": {"engine": "openai", "base-url": chat_url, "models": [{"name": "mock", "aliases": ["LLM"]}]},
            "embedding": {"enabled": True, "model": "all-MiniLM-L6-v2", "path": minilm_path(),
                          "aliases": ["Embedding"], **embedding}}


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def gw():
    with gateway(emb_config()) as server:
        yield server


def embed(gw, **body) -> httpx.Response:
    return httpx.post(gw.url + "/v1/embeddings", json=body, timeout=60)


def test_shape_norm_name_and_usage(gw, minilm):
    response = embed(gw, model="Embedding", input=["a cat sits", "GPUs are fast"])
    parsed = CreateEmbeddingResponse.model_validate(response.json())
    assert parsed.model == "Embedding"  # what the caller asked for
    vectors = np.array([d.embedding for d in parsed.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected_tokens = sum(len(ids) for ids in minilm.tokenizer(["a cat sits", "GPUs are fast"])["input_ids"])
    assert parsed.usage.prompt_tokens == expected_tokens


def test_semantic_sanity(gw):
    data = embed(gw, model="all-MiniLM-L6-v2", input=["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
                                                      "Quarterly earnings beat analyst expectations."]).json()["data"]
    a, b, c = (np.array(d["embedding"]) for d in data)
    assert a @ b > a @ c + 0.3


def test_base64_round_trip_matches_float(gw):
    floats = embed(gw, model="Embedding", input="xin chao").json()["data"][0]["embedding"]
    b64 = embed(gw, model="Embedding", input="xin chao", encoding_format="base64").json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), floats, atol=1e-6)


def test_official_client_and_dimensions(gw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x")
    result = client.embeddings.create(model="Embedding", input=["hello"])  # the client asks for base64
    assert len(result.data[0].embedding) == 384
    assert embed(gw, model="Embedding", input="x", dimensions=384).status_code == 200
    response = embed(gw, model="Embedding", input="x", dimensions=128)
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_bad_embedding_requests(gw):
    assert embed(gw, model="nope", input="x").status_code == 404
    assert embed(gw, model="LLM", input="x").status_code == 400
    assert embed(gw, model="Embedding", input=[]).status_code == 400
    assert embed(gw, model="Embedding", input=[""]).json()["error"]["param"] == "input"
    assert embed(gw, model="Embedding", input=[10**6]).status_code == 400  # not a cl100k id (test_api_token_input)


def test_concurrent_callers_are_batched_and_match_direct_encode(gw, minilm):
    async def run() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": "Embedding", "input": s})
                                               for s in SENTENCES))
        return [r.json()["data"][0]["embedding"] for r in responses]

    before = _batch_stats(gw)
    got = np.array(asyncio.run(run()))
    direct = minilm.encode(SENTENCES)
    assert np.allclose(got, direct, atol=1e-4)
    count, total = (a - b for a, b in zip(_batch_stats(gw), before))
    assert total == 64 and count < 32  # 64 callers, far fewer encode() calls


def _batch_stats(gw) -> tuple[float, float]:
    text = httpx.get(gw.url + "/metrics").text
    count = float(re.search(r'vilms:embedding_batch_size_count\{model="all-MiniLM-L6-v2"\} (\S+)', text).group(1))
    total = float(re.search(r'vilms:embedding_batch_size_sum\{model="all-MiniLM-L6-v2"\} (\S+)', text).group(1))
    return count, total


def test_event_loop_keeps_serving_chat_during_a_large_batch():
    mock = MockBackend(tokens=2)
    with ThreadedServer(mock) as backend, gateway(emb_config(backend.url)) as gw:
        big = [f"long sentence {i} " * 20 for i in range(256)]

        async def run() -> tuple[float, list[float]]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
                embed_task = asyncio.create_task(client.post("/v1/embeddings", json={"model": "Embedding", "input": big}))
                await asyncio.sleep(0.05)  # let the encode start
                chat_done = []
                while not embed_task.done() and len(chat_done) < 50:
                    r = await client.post("/v1/chat/completions", json={"model": "LLM", "messages": [{"role": "user", "content": "x"}]})
                    assert r.status_code == 200
                    chat_done.append(time.perf_counter())
                await embed_task
                return time.perf_counter(), chat_done

        embed_end, chats = asyncio.run(run())
        assert len(chats) >= 3 and chats[0] < embed_end  # chat answered while the batch was encoding


def test_embeddings_disabled_is_a_clear_400():
    config = {"serving": {"models": [{"name": "m"}]}, "embedding": {"enabled": False, "model": "all-MiniLM-L6-v2"}}
    with gateway(config) as gw:
        response = embed(gw, model="all-MiniLM-L6-v2", input="x")
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "embeddings_disabled"
    assert error["message"].count("disabled") == 1


def test_remote_engines_ollama_and_openai_compatible(ollama_standin):
    mock = MockBackend()
    with ThreadedServer(mock) as backend:
        config = {"serving": {"engine": "vllm", "ollama-base-url": ollama_standin.url, "models": [
            {"name": "nomic-embed-text", "type": "embedding", "engine": "ollama", "aliases": ["EMB_OLLAMA"]},
            {"name": "e5-remote", "type": "embedding", "engine": "openai", "base-url": backend.url}]}}
        with gateway(config) as gw:
            one = CreateEmbeddingResponse.model_validate(embed(gw, model="EMB_OLLAMA", input=["a", "b c"]).json())
            two = CreateEmbeddingResponse.model_validate(embed(gw, model="e5-remote", input=["a"]).json())
    assert one.model == "EMB_OLLAMA" and len(one.data) == 2 and one.usage.prompt_tokens == 3
    assert [b for k, b in ollama_standin.state["requests"] if k == "embed"][-1]["model"] == "nomic-embed-text"
    assert two.data[0].embedding == pytest.approx([0.6, 0.8]) and mock.last_request["model"] == "e5-remote"


@pytest.mark.llama
def test_llama_cpp_embeddings_through_gateway(llama_url):
    config = {"serving": {"engine": "openai", "base-url": llama_url,
                          "models": [{"name": "tiny-llm", "type": "embedding", "engine": "openai"}]}}
    with gateway(config) as gw:
        parsed = CreateEmbeddingResponse.model_validate(embed(gw, model="tiny-llm", input=["hi", "there"]).json())
    assert len(parsed.data) == 2 and len(parsed.data[0].embedding) == 64
