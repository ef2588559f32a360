"""Everything a request passes before the gateway spends work on it: key, content type, body budget,
operator caps, part types, and a slot at its backend. Built once per app from the config."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from starlette.requests import Request

from vilms.serve.admission import BackendLimiter, BodyBudget, BodyHold
from vilms.config.model import Config, ConfigError
from vilms.errors import GatewayError, ModelNotFound
from vilms.serve.media import Decoder
from vilms.serve.observe import Observation
from vilms.config.params import RequestPolicy, request_policy
from vilms.config.routing import Route, Router
from vilms.config.schema import ConfigIssue
from vilms.serve.security import ApiKey, KeyRing
from vilms.config.keys import key_entries

_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def caller_request_id(value: str | None) -> str | None:
    """A caller's x-request-id only when short and plain (it is echoed and logged); else None."""
    return value if value is not None and _PLAIN_ID.fullmatch(value) else None


def head_fields(scope: Mapping[str, Any]) -> dict[bytes, bytes]:
    """A request's header fields by their (lower-case, as ASGI servers give them) name; of a repeated field the first,
    as starlette's `Headers.get` has it. One pass: each `Headers.get` walked the list again (a miss by an exception)."""
    return dict(reversed(scope["headers"]))


class Guard:
    def __init__(self, config: Config, router: Router):
        gw, media = config.gateway, config.media
        try:
            self.keys = KeyRing(key_entries(gw), router.resolve, bool(gw["allow-anonymous"]))
        except ValueError as exc:  # the message never quotes a key
            raise ConfigError([ConfigIssue("/gateway/api-keys", str(exc))]) from None
        self.router = router
        self.budget = BodyBudget(gw["max-inflight-body-bytes"], gw["max-key-body-bytes"])
        self.body_limit = gw["max-request-bytes"]
        self.body_timeout = float(gw["body-timeout"])
        self.max_nodes = gw["max-json-nodes"]
        self.context = {"max_parts": media["max-parts-per-message"], "max_messages": gw["max-messages"],
                        "max_tools": gw["max-tools"]}
        self.max_images = media["max-images"]
        self.decoder = Decoder(media["decode-concurrency"])
        self.policies: dict[str, RequestPolicy] = {}
        self.part_types: dict[str, frozenset[str]] = {}
        self.limiters: dict[str, BackendLimiter] = {}
        shared: dict[tuple[str, tuple[str, ...]], BackendLimiter] = {}
        for name, route in router.routes.items():
            self.policies[name] = request_policy(route.spec.params, route.engine, gw)
            self.part_types[name] = frozenset(media["part-types"].get(route.engine, ("text", "image_url")))
            if route.in_gateway:
                continue
            backend = (route.engine, route.base_urls)
            if backend not in shared:  # one limiter per engine service, shared by the models it serves
                shared[backend] = BackendLimiter(f"{route.engine}:{name}", gw["backend-concurrency"],
                                                 gw["backend-queue"], gw["queue-timeout"])
            self.limiters[name] = shared[backend]
        for name, route in router.adapters.items():  # a LoRA adapter runs on its base's service, under its caps
            parent = route.spec.parent
            self.policies[name], self.part_types[name] = self.policies[parent], self.part_types[parent]
            if parent in self.limiters:
                self.limiters[name] = self.limiters[parent]

    def admit(self, fields: Mapping[bytes, bytes], obs: Observation) -> ApiKey | None:
        """Key first (nothing else is told to a stranger), then its rate and concurrency, then content type.
        `fields`: the request's header fields (head_fields)."""
        authorization = fields.get(b"authorization")
        key = self.keys.authenticate(None if authorization is None else authorization.decode("latin-1"))
        if key is not None:
            obs.key = key.name
            key.take_request()
            key.enter()
            obs.on_finish(key.leave)
        if not fields.get(b"content-type", b"")[:16].lower() == b"application/json":
            raise GatewayError("send the body as JSON with 'Content-Type: application/json'", status=415,
                               code="unsupported_media_type")
        return key

    def hold(self, key: ApiKey | None) -> BodyHold:
        """This caller's share of the body budget (anonymous callers share one)."""
        return self.budget.hold(key.name if key is not None else "")

    def visible(self, key: ApiKey | None, kind: str | None = None) -> list[str]:
        """The model names (and aliases) this caller may know of: a scoped key sees only its own."""
        names = self.router.names(kind)
        if key is None or key.models is None:
            return names
        return [n for n in names if (r := self.router.resolve(n)) is not None and key.allows(r.name)]

    def not_found(self, key: ApiKey | None, asked: str, kind: str | None = None) -> ModelNotFound:
        """404 for an unknown model, listing only what this caller may use (never every model's name)."""
        return ModelNotFound(asked, self.visible(key, kind))

    def sees_everything(self, key: ApiKey | None) -> bool:
        """Readiness detail, /metrics, /docs: for unscoped keys (or a gateway without keys); not for scoped keys, nor
        for anonymous callers where keys exist (gateway.allow-anonymous)."""
        return not self.keys.enabled if key is None else key.models is None

    def allow_model(self, key: ApiKey | None, route: Route, asked: str) -> None:
        if key is not None and not key.allows(route.name):
            raise GatewayError(f"this API key may not use model {asked!r}", status=403, type="permission_error",
                               code="model_not_allowed", param="model")

    async def slot(self, route: Route, obs: Observation) -> None:
        """Wait (bounded) for a slot at the route's backend; released when the observation finishes."""
        limiter = self.limiters.get(route.name)
        if limiter is not None:
            owner = obs.key
            await limiter.acquire(owner)  # the key's own line in the backend's queue (fair hand-over)
            obs.on_finish(functools.partial(limiter.release, owner))

    def authorize_read(self, request: Request) -> ApiKey | None:
        """For GET routes that need a key when keys are configured (/v1/models, /metrics)."""
        return self.keys.authenticate(request.headers.get("authorization"))

    def close(self) -> None:
        self.decoder.close()
