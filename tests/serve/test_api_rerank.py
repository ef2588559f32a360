"""POST /v1/rerank and /rerank: a real local CrossEncoder (tiny, random weights, built offline) and vLLM pass-through."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support import CACHE, ThreadedServer, gateway

QUERY = "what does a cat eat"
DOCS = ["cats eat fish and meat", "the rust compiler checks lifetimes", "a cat eats mice", "weather in Hanoi",
        "kittens drink milk"]


@pytest.fixture(scope="module")
def reranker_dir() -> str:
    from devkit.tiny_reranker import ensure

    return str(ensure(CACHE / "models" / "vilms-tiny-reranker-v1"))


@pytest.fixture(scope="module")
def direct(reranker_dir):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(reranker_dir, device="cpu")


def local_config(path: str, **embedding) -> dict:
    return {"host": {"platform": "dgpu"},
            "serving": {"engine": "ollama", "base-url": "http://127.0.0.1:9",
                        "models": [{"name": "tiny-reranker", "type": "reranker", "path": path, "aliases": ["RERANK"]},
                                   {"name": "llama3.2:1b", "type": "llm"}]},
            "embedding": {"enabled": False, **embedding}}


@pytest.fixture(scope="module")
def gw(reranker_dir):
    with gateway(local_config(reranker_dir)) as server:
        yield server


def rerank(gw, path: str = "/v1/rerank", **body) -> httpx.Response:
    return httpx.post(gw.url + path, json={"model": "RERANK", "query": QUERY, "documents": DOCS, **body}, timeout=60)


def test_scores_equal_a_direct_crossencoder_predict_sorted_best_first(gw, direct):
    answer = rerank(gw).json()
    expected = direct.predict([(QUERY, d) for d in DOCS])
    assert answer["model"] == "RERANK" and len(answer["results"]) == len(DOCS)
    by_index = {r["index"]: r["relevance_score"] for r in answer["results"]}
    assert by_index == pytest.approx({i: float(s) for i, s in enumerate(expected)}, abs=1e-6)
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["document"]["text"] for r in answer["results"]] == [DOCS[r["index"]] for r in answer["results"]]
    assert answer["usage"]["total_tokens"] > len(DOCS)


def test_top_n_documents_as_objects_and_return_documents_false(gw):
    full = rerank(gw).json()["results"]
    top = rerank(gw, "/rerank", top_n=2, return_documents=False,
                 documents=[{"text": d} for d in DOCS]).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert all("document" not in r for r in top)


def test_64_concurrent_requests_are_batched(reranker_dir):
    with gateway(local_config(reranker_dir, **{"max-wait-ms": 50})) as gw:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(gw.url + "/v1/rerank", json={
                    "model": "tiny-reranker", "query": f"query {i}", "documents": ["a cat", "a dog"]})
                    for i in range(64)))
        responses = asyncio.run(run())
        assert all(r.status_code == 200 for r in responses)
        calls = gw.app.app.state.gateway.rerankers["tiny-reranker"].predict_calls
    assert 1 <= calls < 64


@pytest.mark.parametrize("body,status,param", [
    ({"documents": []}, 400, "documents"),
    ({"documents": [{"title": "no text"}]}, 400, "documents[0]"),
    ({"query": ""}, 400, "query"),
    ({"top_n": 0}, 400, "top_n"),
    ({"model": "llama3.2:1b"}, 400, "model"),
    ({"model": "nope"}, 404, "model"),
])
def test_bad_requests_have_envelopes(gw, body, status, param):
    r = rerank(gw, **body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_models_lists_the_reranker_with_its_type_and_chat_refuses_it(gw):
    data = {m["id"]: m for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    assert data["tiny-reranker"]["type"] == "reranker" and data["RERANK"]["alias_of"] == "tiny-reranker"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "RERANK", "messages": [{"role": "user",
                                                                                           "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_reranker_on_ollama_is_a_config_error():
    from vilms.config.model import ConfigError
    from vilms.config.load import build_config

    with pytest.raises(ConfigError, match="no rerank API"):
        build_config({"serving": {"models": [{"name": "r", "type": "reranker", "engine": "ollama"}]}})


def test_vllm_passthrough_records_the_request():
    from devkit.openai_standin import create_app

    app = create_app(["BAAI/bge-reranker-base"])
    with ThreadedServer(app) as engine:
        config = {"host": {"platform": "dgpu"},
                  "serving": {"engine": "vllm", "vllm-base-url": engine.url,
                              "models": [{"name": "BAAI/bge-reranker-base", "type": "reranker", "engine": "vllm",
                                          "aliases": ["RERANK"]}]}}
        with gateway(config) as gw:
            answer = rerank(gw, top_n=2).json()
        path, sent, headers = app.state.standin["requests"][-1]
    assert path == "/v1/rerank"
    assert sent == {"model": "BAAI/bge-reranker-base", "query": QUERY, "documents": DOCS, "top_n": 2}
    assert headers["x-request-id"]
    assert [r["document"]["text"] for r in answer["results"]] == ["a cat eats mice", "cats eat fish and meat"]
