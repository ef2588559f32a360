"""Third-party clients as contract checkers (pinned in the dev extra): LangChain's ChatOpenAI and OpenAIEmbeddings
(default settings: token-id input), and the litellm SDK, against the Ollama engine (stand-in) and the real
llama.cpp engine. tiktoken's cl100k file is the one shipped in vilms/_data, put where tiktoken looks first, so
nothing is downloaded. LlamaIndex's OpenAILike pins openai<3 while the project runs openai 3, so it runs from its own
pinned venv (`make install` builds .venv-llamaindex) as a subprocess: tests/clients/llamaindex_check.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import gateway

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import

ROOT = Path(__file__).resolve().parents[2]
LLAMAINDEX_PYTHON = Path(os.environ.get("VILMS_LLAMAINDEX_PYTHON", ROOT / ".venv-llamaindex" / "bin" / "python"))
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module", autouse=True)
def tiktoken_offline(tmp_path_factory):
    """tiktoken reads $TIKTOKEN_CACHE_DIR/<sha1 of the URL> before any download: seed it with the shipped file."""
    from vilms.serve.tokens import CL100K_FILE

    cache = tmp_path_factory.mktemp("tiktoken")
    shutil.copy(CL100K_FILE, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield
    if old is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture()
def ollama_gw(ollama_standin):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "ollama", "base-url": ollama_standin.url,
                          "models": [{"name": "llama3.2:1b", "type": "llm", "aliases": ["LLM"],
                                      "params": {"max-tokens": 4}},
                                     {"name": "nomic-embed-text", "type": "embedding", "engine": "ollama",
                                      "aliases": ["Embedding"]}]}}
    with gateway(config) as server:
        yield server


@pytest.fixture(scope="module")
def llama_gw(llama_url):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "openai", "base-url": llama_url + "/v1",
                          "models": [{"name": "tiny-llm", "type": "llm", "aliases": ["LLM"], "params": {"max-tokens": 4}},
                                     {"name": "tiny-emb", "type": "embedding", "engine": "openai",
                                      "base-url": llama_url + "/v1", "aliases": ["Embedding"]}]}}
    with gateway(config) as server:
        yield server


def chat_model(gw, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="LLM", base_url=gw.url + "/v1", api_key="x", max_retries=0, **kw)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def last_chat(standin) -> dict:
    return [body for kind, body in standin.state["requests"] if kind == "chat"][-1]


# -- LangChain ChatOpenAI ---------------------------------------------------------------------------------------


def test_langchain_invoke_and_stream_on_ollama(ollama_gw):
    llm = chat_model(ollama_gw)
    message = llm.invoke("hello")
    assert len(message.content.split()) == 4 and message.usage_metadata["output_tokens"] == 4
    pieces = [chunk.content for chunk in llm.stream("hello")]
    assert "".join(pieces) == message.content and len([p for p in pieces if p]) == 4


def test_langchain_bind_tools_round_trip_on_ollama(ollama_gw, ollama_standin):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat_model(ollama_gw).bind_tools([add])
    question = HumanMessage("what is 2 + 3?")
    ai = llm.invoke([question])
    assert [call["name"] for call in ai.tool_calls] == ["add"]
    results = [ToolMessage("5", tool_call_id=call["id"]) for call in ai.tool_calls]
    llm.invoke([question, ai, *results])
    sent = last_chat(ollama_standin)["messages"]
    assert sent[1]["tool_calls"][0]["id"] == ai.tool_calls[0]["id"]
    assert sent[2]["tool_name"] == "add" and sent[2]["content"] == "5"


def test_langchain_streamed_tool_calls_on_ollama(ollama_gw):
    def mul(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    chunks = list(chat_model(ollama_gw).bind_tools([add, mul]).stream("2 and 3?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [call["name"] for call in merged.tool_calls] == ["add", "mul"]


def test_langchain_structured_output_on_ollama(ollama_gw, ollama_standin):
    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: str
        confidence: float

    result = chat_model(ollama_gw).with_structured_output(Answer).invoke("what is a cat?")
    assert isinstance(result, Answer) and result.answer
    assert last_chat(ollama_standin)["format"]["properties"].keys() == {"answer", "confidence"}


@pytest.mark.llama
def test_langchain_invoke_and_stream_on_llama_cpp(llama_gw):
    llm = chat_model(llama_gw)
    assert llm.invoke("hello").content
    assert "".join(chunk.content for chunk in llm.stream("hello"))


# -- LangChain OpenAIEmbeddings, default settings (token-id arrays) --------------------------------------------


def _embeddings_agree(gw):
    import openai
    from langchain_openai import OpenAIEmbeddings

    texts = ["a cat sits on the mat", "GPUs are fast"]
    bodies: list[dict] = []
    seen = httpx.Client(event_hooks={"request": [lambda r: bodies.append(json.loads(r.read()))]})
    vectors = OpenAIEmbeddings(model="Embedding", base_url=gw.url + "/v1", api_key="x", max_retries=0,
                               http_client=seen).embed_documents(texts)
    assert all(isinstance(row, list) and all(isinstance(t, int) for t in row) for row in bodies[0]["input"])
    direct = openai.OpenAI(base_url=gw.url + "/v1", api_key="x").embeddings.create(model="Embedding", input=texts)
    for got, want in zip(vectors, direct.data):
        assert np.allclose(got, want.embedding, atol=1e-5)


def test_langchain_embeddings_default_settings_on_ollama(ollama_gw, ollama_standin):
    _embeddings_agree(ollama_gw)
    sent = [body for kind, body in ollama_standin.state["requests"] if kind == "embed"]
    assert sent[0]["input"] == sent[1]["input"] == ["a cat sits on the mat", "GPUs are fast"]


@pytest.mark.llama
def test_langchain_embeddings_default_settings_on_llama_cpp(llama_gw):
    _embeddings_agree(llama_gw)


# -- litellm SDK ------------------------------------------------------------------------------------------------


def _litellm_round(gw):
    import litellm

    common = {"api_base": gw.url + "/v1", "api_key": "x"}
    reply = litellm.completion(model="openai/LLM", messages=[{"role": "user", "content": "hi"}], **common)
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    streamed = litellm.completion(model="openai/LLM", messages=[{"role": "user", "content": "hi"}], stream=True,
                                  **common)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text
    embedded = litellm.embedding(model="openai/Embedding", input=["a cat", "a dog"], **common)
    assert len(embedded.data) == 2
    return reply, text


def test_litellm_on_ollama(ollama_gw):
    reply, text = _litellm_round(ollama_gw)
    assert text == reply.choices[0].message.content


@pytest.mark.llama
def test_litellm_on_llama_cpp(llama_gw):
    _litellm_round(llama_gw)


# -- LlamaIndex OpenAILike, default (completions) mode, from its own venv --------------------------------------------


def _llamaindex_round(gw) -> dict:
    if not LLAMAINDEX_PYTHON.exists():
        pytest.skip(f"{LLAMAINDEX_PYTHON} is missing: `make install` builds the pinned LlamaIndex venv")
    run = subprocess.run([str(LLAMAINDEX_PYTHON), str(ROOT / "tests" / "serve" / "clients" / "llamaindex_check.py"), gw.url],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["is_chat_model"] is False and result["raw_object"] == "text_completion"
    assert result["complete"] and result["chat"]
    assert "".join(result["deltas"]), result
    return result


def test_llamaindex_openai_like_on_ollama(ollama_gw, ollama_standin):
    _llamaindex_round(ollama_gw)
    sent = [(kind, body["model"]) for kind, body in ollama_standin.state["requests"]]
    assert sent == [("generate", "llama3.2:1b")] * 3  # complete, stream_complete, chat: all through /api/generate


@pytest.mark.llama
def test_llamaindex_openai_like_on_llama_cpp(llama_gw):
    _llamaindex_round(llama_gw)
