"""The gateway's OpenAPI description, built from the very models the handlers validate with.

The hot routes take a raw Request (they are served straight from ASGI), so FastAPI alone would describe
them with no request body; here every body and response is attached from the pydantic models, so a
property-based fuzzer (schemathesis) generates real requests and checks real responses.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from vilms.config.routing import Router
from vilms.serve.rerank import RerankRequest
from vilms.serve.api.completions import CompletionRequest
from vilms.serve.api.requests import ChatRequest, EmbeddingRequest
from vilms.serve.api.responses import ResponsesRequest

_OPEN = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error the gateway answers, whatever the status."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorBody


class ToolCallOut(BaseModel):
    model_config = _OPEN
    id: str
    type: Literal["function"]
    function: dict[str, Any]


class AssistantMessage(BaseModel):
    model_config = _OPEN
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    model_config = _OPEN
    index: int
    message: AssistantMessage
    finish_reason: str | None


class Usage(BaseModel):
    model_config = _OPEN
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class ChatCompletion(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Embedding(BaseModel):
    model_config = _OPEN
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    model_config = _OPEN
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: Usage


class ModelCard(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    model_config = _OPEN
    object: Literal["list"]
    data: list[ModelCard]


class ResponseObject(BaseModel):
    """A Responses API answer (stateless): the fields every client reads; the rest passes as the engine made it."""

    model_config = _OPEN
    id: str
    object: Literal["response"]
    created_at: float
    model: str
    status: str
    output: list[dict[str, Any]]


class RerankResult(BaseModel):
    model_config = _OPEN
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class RerankList(BaseModel):
    model_config = _OPEN
    model: str
    results: list[RerankResult]


class CompletionChoice(BaseModel):
    model_config = _OPEN
    index: int
    text: str
    finish_reason: str | None


class TextCompletion(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = _OPEN
    status: Literal["ready", "unavailable"]
    models: list[dict[str, Any]] | None = None
    backends: list[dict[str, Any]] | None = None


# Each server-sent event: `data:` holds a chat.completion.chunk, an error envelope, or "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}

_ERRORS = {"400": "invalid request", "401": "missing or invalid API key", "403": "key may not use this model",
           "404": "unknown model", "405": "method not allowed", "408": "body not received in time",
           "413": "body too large", "415": "not application/json", "429": "over capacity or rate limit",
           "499": "client closed the connection", "500": "gateway fault", "502": "engine error",
           "503": "engine unreachable or gateway overloaded", "504": "engine timeout"}


def _drop_fastapi_validation(paths: dict[str, Any], components: dict[str, Any]) -> None:
    """FastAPI adds a 422 and query parameters for handlers with parameters; the gateway answers 400 itself."""
    for path in paths.values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
            kept = [p for p in operation.pop("parameters", []) if p.get("in") == "path"]
            if kept:  # /v1/models/{model_id}: the one path parameter the gateway takes
                operation["parameters"] = kept
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)


def describe(app: FastAPI, router: Router) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel], mode: Literal["validation", "serialization"] = "validation") -> dict[str, str]:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    errors = {"content": {"application/json": {"schema": ref(ErrorEnvelope)}}}

    def responses(ok: dict[str, Any], *codes: str) -> dict[str, Any]:
        out = {"200": {"description": "OK", "content": ok}}
        out.update({c: {"description": _ERRORS[c], **errors} for c in codes})
        return out

    post_errors = ("400", "401", "403", "404", "408", "413", "415", "429", "499", "500", "502", "503", "504")
    paths = schema["paths"]
    for path, request, answer, stream in (("/v1/chat/completions", ChatRequest, ChatCompletion, True),
                                          ("/v1/embeddings", EmbeddingRequest, EmbeddingList, False),
                                          ("/v1/responses", ResponsesRequest, ResponseObject, True),
                                          ("/v1/completions", CompletionRequest, TextCompletion, True),
                                          ("/v1/rerank", RerankRequest, RerankList, False),
                                          ("/rerank", RerankRequest, RerankList, False)):
        operation = paths[path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        ok = {"application/json": {"schema": ref(answer)}}
        if stream:
            ok["text/event-stream"] = {"schema": _SSE_EVENT}
        operation["responses"] = responses(ok, *post_errors)
    paths["/v1/models"]["get"]["responses"] = responses({"application/json": {"schema": ref(ModelList)}}, "401")
    paths["/v1/models/{model_id}"]["get"]["responses"] = responses(
        {"application/json": {"schema": ref(ModelCard)}}, "401", "404")
    paths["/health_check"]["get"]["responses"] = responses({"application/json": {"schema": ref(Health)}})
    ready = responses({"application/json": {"schema": ref(Readiness)}})
    ready["503"] = {"description": "no engine ready", "content": {"application/json": {"schema": ref(Readiness)}}}
    paths["/health/ready"]["get"]["responses"] = ready
    paths["/metrics"]["get"]["responses"] = responses({"text/plain": {"schema": {"type": "string"}}}, "401", "403")
    _drop_fastapi_validation(paths, components)
    for model, kind in (("ChatRequest", "chat"), ("EmbeddingRequest", "embedding"), ("ResponsesRequest", "chat"),
                        ("CompletionRequest", "chat"), ("RerankRequest", "reranker")):
        # the names this gateway serves (any other is a 404): a fuzzer then reaches the engines
        components[model]["properties"]["model"]["enum"] = router.names(kind) or [""]
    app.openapi_schema = schema
    return schema
