"""POST /v1/chat/completions: the request as the caller sent it, model renamed and defaults filled, to the engine."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from vilms.config.params import enforce_policy
from vilms.serve.api.bodies import whole
from vilms.serve.large import Large, discard
from vilms.serve.api.pipeline import Admitted
from vilms.serve.api.requests import ChatRequest, checked
from vilms.serve.engines.openai_compat import OpenAICompatEngine

PATH = "/v1/chat/completions"


async def handle(body: dict[str, Any], admitted: Admitted) -> Response:
    parsed = await checked(ChatRequest, body, admitted.guard.context)
    route = admitted.resolve(parsed.model, "chat", PATH)
    enforce_policy(parsed.model_extra, parsed.n, admitted.policy(route))
    admitted.fill(route, body)
    body["messages"] = await admitted.images(route, body["messages"], body if type(body) is Large else None)
    engine = admitted.engine(route)
    if not isinstance(engine, OpenAICompatEngine):  # it translates the body: long texts it reads become strings
        body = await whole(body)
    await admitted.slot(route)
    try:
        return await engine.chat(admitted.generation(route, body, parsed.stream_options))
    finally:
        if type(body) is Large:  # sent (or failed): what it and its model hold is freed in the body thread
            discard(body, parsed)
