"""POST /v1/embeddings: in-gateway models through their batcher, engine-served ones through the engine."""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.responses import Response

from vilms.errors import BadRequest, GatewayError
from vilms.serve.embeddings.response import embedding_body, plain_embedding_request, texts_from_input
from vilms.serve.tokens import decode_token_input
from vilms.serve.api.pipeline import JSON, Admitted
from vilms.serve.api.requests import EmbeddingRequest, validated

PATH = "/v1/embeddings"


def _unknown(admitted: Admitted, asked: str) -> GatewayError:
    """A gateway serving no embedding model says so, rather than listing nothing."""
    state = admitted.state
    emb = state.config.embedding
    if not state.router.names("embedding") or (asked == emb.get("model") and not emb.get("enabled")):
        return BadRequest("embeddings are disabled on this gateway (embedding.enabled: false and no "
                          "type: embedding models)", code="embeddings_disabled", param="model")
    return admitted.not_found(asked, "embedding")


async def handle(body: dict[str, Any], admitted: Admitted) -> Response:
    parsed = plain_embedding_request(body) or validated(EmbeddingRequest, body)
    state = admitted.state
    route = state.router.resolve(parsed.model)
    if route is None:
        raise _unknown(admitted, parsed.model)
    admitted.accept(route, parsed.model, "embedding", PATH)
    texts = texts_from_input(await decode_token_input(parsed.input))
    await admitted.slot(route)
    embedder = state.embedders.get(route.name)
    if embedder is not None:
        vectors, tokens = await embedder.embed(texts, parsed.dimensions, route.spec.matryoshka)
    else:
        result = await admitted.engine(route).embed(route, texts, parsed.dimensions)
        vectors, tokens = np.asarray(result.vectors, dtype=np.float32), result.prompt_tokens
    body = embedding_body(parsed.model, vectors, tokens, parsed.encoding_format)
    admitted.obs.finish(200)  # after the answer is built: a failure building it is counted as what it is
    return Response(body, media_type=JSON)
