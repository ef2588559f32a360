"""POST /v1/rerank and /rerank: a local CrossEncoder in the gateway, or the engine's own /v1/rerank (vLLM)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from vilms.serve.engines import ChatCall
from vilms.errors import BadRequest
from vilms.serve.observe import Observation
from vilms.serve.rerank import RerankRequest, document_texts, rerank_body
from vilms.config.params import enforce_policy, refused_fields
from vilms.serve.api.guard import Admitted
from vilms.serve.api.requests import validated
from vilms.serve.api.state import GatewayState


async def handle(body: dict[str, Any], state: GatewayState, obs: Observation, admitted: Admitted) -> Response:
    parsed = validated(RerankRequest, body)
    texts = document_texts(parsed.documents)
    route = state.router.resolve(parsed.model)
    if route is None:
        raise admitted.not_found(parsed.model, "reranker")
    if route.spec.type != "reranker":
        raise BadRequest(f"{parsed.model!r} is a {route.spec.type} model, not a reranker", param="model")
    admitted.allow(route, parsed.model)
    obs.bind(route.name, route.engine)
    await admitted.slot(route, obs)
    if route.engine != "local":  # passed through: the same refusal list as every route
        enforce_policy(refused_fields(body), None, admitted.policy(route))
        call = ChatCall(route, {**body, "model": route.name}, obs)
        return await state.engines[route.engine].forward(call, "/v1/rerank")
    scores, tokens = await state.rerankers[route.name].score(parsed.query, texts)
    obs.finish(200)
    return Response(orjson.dumps(rerank_body(parsed.model, parsed, texts, scores, tokens)),
                    media_type="application/json")
