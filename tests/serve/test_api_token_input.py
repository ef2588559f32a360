"""Token-id arrays as embeddings input (LangChain's OpenAIEmbeddings default): cl100k ids decoded to text."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import gateway

HELLO_WORLD = [15339, 1917]  # "hello world" in cl100k_base, as OpenAI's tokenizer gives it


@pytest.fixture()
def gw(ollama_standin):
    config = {"host": {"platform": "dgpu"},
              "serving": {"ollama-base-url": ollama_standin.url,
                          "models": [{"name": "nomic-embed-text", "type": "embedding", "engine": "ollama",
                                      "aliases": ["Embedding"]}]}}
    with gateway(config) as server:
        yield server


def sent_inputs(standin) -> list[str]:
    return [body for kind, body in standin.state["requests"] if kind == "embed"][-1]["input"]


def test_packaged_encoding_decodes_known_ids():
    from vilms.serve.tokens import cl100k

    encoding = cl100k()
    assert encoding.decode(HELLO_WORLD) == "hello world"
    assert encoding.n_vocab == 100277
    text = "Xin chào, thế giới! GPUs are fast."
    assert encoding.decode(encoding.encode(text)) == text


def test_token_arrays_reach_the_engine_as_the_text_they_spell(gw, ollama_standin):
    from vilms.serve.tokens import cl100k

    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    ids = cl100k().encode("a cat sits on the mat")
    by_ids = c.embeddings.create(model="Embedding", input=[HELLO_WORLD, ids])
    assert sent_inputs(ollama_standin) == ["hello world", "a cat sits on the mat"]
    by_text = c.embeddings.create(model="Embedding", input=["hello world", "a cat sits on the mat"])
    assert [d.embedding for d in by_ids.data] == [d.embedding for d in by_text.data]
    c.embeddings.create(model="Embedding", input=HELLO_WORLD)  # one flat array: one input
    assert sent_inputs(ollama_standin) == ["hello world"]


@pytest.mark.parametrize("value", [[10**6], [[15339], [-1]], [[15339], []], [[1.5]], [[15339] * 9000]])
def test_bad_token_arrays_are_a_400_before_the_engine(gw, ollama_standin, value):
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": "Embedding", "input": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert not [1 for kind, _ in ollama_standin.state["requests"] if kind == "embed"]
