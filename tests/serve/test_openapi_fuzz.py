"""The gateway's OpenAPI description is complete (every body and response from the handlers' own models),
and a schemathesis property-based run against it, with stand-in engines, finds no 5xx and no response that
breaks the description. Bounded: about 1,200 generated cases over every route, positive and negative."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.support import CACHE, gateway, mock_backend
from vilms.serve.api.requests import ChatRequest, EmbeddingRequest

KEY = "sk-fuzz-0123456789abcdef"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 100}


def fuzz_config(openai_url: str, ollama_url: str, reranker: str) -> dict:
    return {"host": {"platform": "dgpu"},
            "serving": {"engine": "openai", "ollama-base-url": ollama_url, "models": [
                {"name": "mock", "engine": "openai", "base-url": openai_url, "aliases": ["LLM"],
                 "params": {"max-tokens-cap": 64}},
                {"name": "llama3.2:1b", "engine": "ollama", "aliases": ["SMALL"]},
                {"name": "embed", "type": "embedding", "engine": "openai", "base-url": openai_url},
                {"name": "tiny-reranker", "type": "reranker", "path": reranker}]},
            "gateway": {"openapi": True, "api-keys": [{"name": "fuzz", "key": KEY}]}}


@pytest.fixture(scope="module")
def fuzz_gateway(request):
    from devkit.ollama_standin import create_app
    from devkit.tiny_reranker import ensure
    from tests.support import ThreadedServer

    with mock_backend(tokens=3) as backend, ThreadedServer(create_app(["llama3.2:1b"])) as ollama:
        with gateway(fuzz_config(backend.url, ollama.url, str(ensure(CACHE / "models" / "vilms-tiny-reranker-v1")))) as gw:
            yield gw


def test_openapi_describes_every_body_and_response_from_the_handler_models(fuzz_gateway):
    schema = httpx.get(fuzz_gateway.url + "/openapi.json", headers={"authorization": f"Bearer {KEY}"}).json()
    components = schema["components"]["schemas"]
    for path, model in (("/v1/chat/completions", ChatRequest), ("/v1/embeddings", EmbeddingRequest)):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert set(components[model.__name__]["properties"]) == set(model.model_fields) - {"schema_"} | {
            f.alias for f in model.model_fields.values() if f.alias}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    assert media["schema"], (path, method, status)  # no empty `{}` schemas
            assert "422" not in operation["responses"]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_gateway):
    schema = schemathesis.openapi.from_dict(httpx.get(fuzz_gateway.url + "/openapi.json", headers={"authorization": f"Bearer {KEY}"}).json())
    headers = {"authorization": f"Bearer {KEY}"}
    seen: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # GET routes take no input to break

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call_and_validate(base_url=fuzz_gateway.url, headers=headers, checks=CHECKS,
                                                  timeout=30)
                seen[operation.label] = seen.get(operation.label, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            run()
    assert set(seen) == {"GET /health_check", "GET /health/ready", "GET /metrics", "GET /v1/models",
                         "GET /v1/models/{model_id}", "POST /v1/chat/completions", "POST /v1/embeddings",
                         "POST /v1/responses", "POST /v1/completions", "POST /v1/rerank", "POST /rerank"}
    assert sum(seen.values()) >= 1000, seen
    assert not any(status >= 500 for status in statuses), statuses
    assert statuses.get(200, 0) >= 100, statuses  # the fuzzer reached the engines, not only the validators
