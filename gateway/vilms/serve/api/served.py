"""What the text-generation routes beyond chat (responses, completions) share with it: name → chat model route."""

from __future__ import annotations

from vilms.errors import BadRequest
from vilms.serve.observe import Observation
from vilms.config.routing import Route
from vilms.serve.api.guard import Admitted
from vilms.serve.api.state import GatewayState


def chat_route(state: GatewayState, name: str, obs: Observation, route_name: str, admitted: Admitted) -> Route:
    """Resolve `name` (model or alias) to a chat model, the same way /v1/chat/completions does."""
    router = state.router
    route = router.resolve(name)
    if route is None:
        raise admitted.not_found(name, "chat")
    if route.spec.type in ("embedding", "reranker"):
        raise BadRequest(f"{name!r} is a {route.spec.type} model; {route_name} serves chat models", param="model")
    admitted.allow(route, name)
    obs.bind(route.name, route.engine)
    return route
