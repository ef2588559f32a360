"""The GET routes: liveness, readiness, metrics, and the model list (what each caller may know of)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from vilms.config.routing import Route
from vilms.errors import GatewayError
from vilms.serve.observe import REGISTRY
from vilms.serve.api.guard import Guard
from vilms.serve.api.pipeline import JSON
from vilms.serve.api.state import GatewayState


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type=JSON)


def _entry(state: GatewayState, name: str, route: Route) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "vilms", "type": route.spec.type,
            "engine": route.engine}


def model_entries(state: GatewayState, allows: Any) -> list[dict[str, Any]]:
    """Models, adapters (with their parent) and aliases that resolve (with their target), as the key may see."""
    router = state.router
    data = [_entry(state, name, route) for name, route in router.routes.items() if allows(name)]
    data += [{**_entry(state, name, route), "parent": route.spec.parent}
             for name, route in router.adapters.items() if allows(name)]
    for alias in router.aliases:
        route = router.resolve(alias)
        if route is not None and allows(route.name):
            data.append({**_entry(state, alias, route), "alias_of": route.name})
    return data


def add_read_routes(app: FastAPI, state: GatewayState, guard: Guard) -> None:
    @app.get("/health_check")
    async def health_check() -> Response:
        return json_response({"status": "ok"})

    @app.get("/health/ready")
    async def health_ready(request: Request) -> Response:
        report = await state.readiness()
        status = 200 if report["status"] == "ready" else 503
        if guard.keys.enabled:  # without a key, or with one scoped to some models: the verdict only
            try:
                if not guard.sees_everything(guard.authorize_read(request)):
                    return json_response({"status": report["status"]}, status=status)
            except GatewayError:
                return json_response({"status": report["status"]}, status=status)
        return json_response(report, status=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not guard.sees_everything(guard.authorize_read(request)):  # labels name every model and key
            raise GatewayError("/metrics needs a key that is not scoped to some models", status=403,
                               type="permission_error", code="admin_key_required")
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        key = guard.authorize_read(request)
        allows = (lambda name: True) if key is None else key.allows
        return json_response({"object": "list", "data": model_entries(state, allows)})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str) -> Response:
        """One entry of /v1/models (openai's `client.models.retrieve`); ids may hold slashes (Qwen/Qwen3-4B)."""
        key = guard.authorize_read(request)
        route = state.router.resolve(model_id)
        if route is None or (key is not None and not key.allows(route.name)):
            raise guard.not_found(key, model_id)
        entry = _entry(state, model_id, route)
        if route.spec.parent:
            entry["parent"] = route.spec.parent
        return json_response(entry if model_id == route.name else {**entry, "alias_of": route.name})
