"""/health/ready reports every configured model with its state; 200 only when every one is ready.

Real HTTP throughout: the gateway on a loopback port, the Ollama stand-in and llama.cpp as engines,
a closed port as an engine that is down, the real MiniLM for local embeddings.
"""

from __future__ import annotations

import httpx

from tests.support import free_port, gateway, minilm_path


def two_chat_engines(ollama_url: str, openai_url: str) -> dict:
    return {"serving": {"engine": "openai", "ollama-base-url": ollama_url, "models": [
        {"name": "llama3.2:1b", "engine": "ollama", "aliases": ["LLM"]},
        {"name": "tiny-llm", "engine": "openai", "base-url": openai_url + "/v1", "aliases": ["LLM_BIG"]}]},
        "model-aliases": {"LLM_SMALL": "LLM"}}


def by_model(report: dict) -> dict[str, dict]:
    return {m["model"]: m for m in report["models"]}


def test_one_of_two_chat_engines_down_is_503_and_names_each_model(ollama_standin):
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(two_chat_engines(ollama_standin.url, dead)) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 503
        models = by_model(response.json())
        assert set(models) == {"llama3.2:1b", "tiny-llm"}
        assert models["llama3.2:1b"]["state"] == "ready" and models["llama3.2:1b"]["ready"] is True
        assert set(models["llama3.2:1b"]["aliases"]) == {"LLM", "LLM_SMALL"}
        assert models["tiny-llm"]["engine"] == "openai"
        assert models["tiny-llm"]["state"] == "unreachable" and models["tiny-llm"]["ready"] is False
        assert models["tiny-llm"]["aliases"] == ["LLM_BIG"]
        assert "127.0.0.1" not in response.text  # names models, never upstream addresses


def test_every_engine_up_is_200(ollama_standin, llama_url):
    with gateway(two_chat_engines(ollama_standin.url, llama_url)) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 200, response.text
        assert {m["state"] for m in response.json()["models"]} == {"ready"}


def test_ollama_model_not_pulled_is_missing(ollama_standin):
    config = {"serving": {"engine": "ollama", "ollama-base-url": ollama_standin.url,
                          "models": [{"name": "llama3.2:1b"}, {"name": "qwen2.5:3b"}]}}
    with gateway(config) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 503
        models = by_model(response.json())
        assert models["llama3.2:1b"]["state"] == "ready" and models["qwen2.5:3b"]["state"] == "missing"
        httpx.post(ollama_standin.url + "/api/pull", json={"model": "qwen2.5:3b", "stream": False}, timeout=10)
        assert httpx.get(gw.url + "/health/ready", timeout=10).status_code == 200


def embedding_config(ollama_url: str, path: str) -> dict:
    return {"serving": {"engine": "ollama", "ollama-base-url": ollama_url, "models": [{"name": "llama3.2:1b"}]},
            "embedding": {"enabled": True, "model": "minilm", "path": path, "load": "lazy", "aliases": ["Embedding"]}}


def test_lazy_embedder_counts_only_when_its_files_exist(ollama_standin, tmp_path):
    with gateway(embedding_config(ollama_standin.url, str(tmp_path / "absent"))) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 503  # before: any lazy embedder counted as ready
        assert by_model(response.json())["minilm"] == {"model": "minilm", "type": "embedding", "engine": "local",
                                                       "aliases": ["Embedding"], "state": "not-found", "ready": False}
    with gateway(embedding_config(ollama_standin.url, minilm_path())) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 200, response.text
        assert by_model(response.json())["minilm"]["state"] == "loadable"
        assert gw.app.state.gateway.embedders["minilm"].model is None  # probing did not load it
        vectors = httpx.post(gw.url + "/v1/embeddings", json={"model": "Embedding", "input": "hello"}, timeout=120)
        assert vectors.status_code == 200
        assert by_model(httpx.get(gw.url + "/health/ready", timeout=10).json())["minilm"]["state"] == "ready"


def test_eager_embedder_that_fails_to_load_is_failed(ollama_standin, tmp_path):
    config = embedding_config(ollama_standin.url, str(tmp_path / "absent"))
    config["embedding"]["load"] = "eager"
    with gateway(config) as gw:
        response = httpx.get(gw.url + "/health/ready", timeout=10)
        assert response.status_code == 503
        assert by_model(response.json())["minilm"]["state"] == "failed"
