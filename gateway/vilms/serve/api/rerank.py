"""POST /v1/rerank and /rerank: a local CrossEncoder in the gateway, or the engine's own /v1/rerank (vLLM)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from vilms.config.params import enforce_policy, refused_fields
from vilms.serve.engines import ChatCall
from vilms.serve.rerank import RerankRequest, document_texts, rerank_body
from vilms.serve.api.pipeline import Admitted
from vilms.serve.api.requests import validated


async def handle(body: dict[str, Any], admitted: Admitted) -> Response:
    parsed = validated(RerankRequest, body)
    texts = document_texts(parsed.documents)
    route = admitted.resolve(parsed.model, "reranker", "/v1/rerank")
    await admitted.slot(route)
    state = admitted.state
    local = state.rerankers.get(route.name)
    if local is None:  # passed through: the same refusal list as every route
        enforce_policy(refused_fields(body), None, admitted.policy(route))
        call = ChatCall(route, {**body, "model": route.name}, admitted.obs)
        return await admitted.engine(route).forward(call, "/v1/rerank")
    scores, tokens = await local.score(parsed.query, texts)
    admitted.obs.finish(200)
    return Response(orjson.dumps(rerank_body(parsed.model, parsed, texts, scores, tokens)),
                    media_type="application/json")
