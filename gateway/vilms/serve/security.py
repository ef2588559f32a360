"""API keys at run time: who may call the gateway, for which models, how often (reading them: `vilms.config.keys`).

Keys come from `gateway.api-keys` and the YAML file named by `gateway.api-keys-file` (merged). A key is
never stored or compared in clear: each is kept as its SHA-256 digest and a presented token is hashed
once and compared with `hmac.compare_digest` against every digest, with no early exit, so timing tells
an attacker neither which key nor which prefix matched. Only a key's name ever reaches a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


from vilms.errors import GatewayError

_BEARER = "bearer "


@dataclass
class ApiKey:
    """One configured key: its name (logged), digest (compared), scope and limits."""

    name: str
    digest: bytes
    models: frozenset[str] | None = None  # route names it may use; None = every model
    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    active: int = 0
    _tokens: float = 0.0
    _refilled: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._tokens = float(self.requests_per_minute or 0)  # a full bucket: a minute's burst at start

    def allows(self, route_name: str) -> bool:
        return self.models is None or route_name in self.models

    def take_request(self) -> None:
        """Token bucket of `requests_per_minute`, refilled continuously; empty -> 429 with the wait."""
        if self.requests_per_minute is None:
            return
        now = time.monotonic()
        rate = self.requests_per_minute / 60.0
        self._tokens = min(float(self.requests_per_minute), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            wait = max(1, int((1.0 - self._tokens) / rate + 0.999))
            raise RateLimited(f"API key {self.name!r} is over its {self.requests_per_minute} requests per minute",
                              retry_after=wait, code="rate_limit_exceeded")
        self._tokens -= 1.0

    def enter(self) -> None:
        if self.max_concurrency is not None and self.active >= self.max_concurrency:
            raise RateLimited(f"API key {self.name!r} already has {self.max_concurrency} requests in flight",
                              retry_after=1, code="concurrency_limit_exceeded")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class RateLimited(GatewayError):
    """429 with a Retry-After hint (seconds)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int = 1, code: str = "rate_limit_exceeded"):
        super().__init__(message, code=code)
        self.retry_after = retry_after


def unauthorized(message: str = "missing or invalid API key; send 'Authorization: Bearer <key>'") -> GatewayError:
    return GatewayError(message, status=401, type="invalid_request_error", code="invalid_api_key")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys; `authenticate` maps an Authorization header to a key or raises 401."""

    def __init__(self, entries: Iterable[Mapping[str, Any]], resolve: Any, allow_anonymous: bool = False):
        self.keys: list[ApiKey] = []
        names: set[str] = set()
        for entry in entries:
            name = str(entry["name"])
            if name in names:
                raise ValueError(f"API key name {name!r} is used twice")
            names.add(name)
            scope = entry.get("models")
            routes = None
            if scope is not None:
                routes = frozenset(r.name for r in (resolve(m) for m in scope) if r is not None)
            self.keys.append(ApiKey(name, _digest(str(entry["key"])), routes, entry.get("max-concurrency"),
                                    entry.get("requests-per-minute")))
        self.allow_anonymous = allow_anonymous

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, header: str | None) -> ApiKey | None:
        """The key presented, None when no keys are configured (or anonymous calls are allowed and none sent)."""
        if not self.keys:
            return None
        if not header or header[:7].lower() != _BEARER:
            if self.allow_anonymous:
                return None
            raise unauthorized()
        presented = _digest(header[7:].strip())
        found = None
        for key in self.keys:  # every digest compared, no early exit
            if hmac.compare_digest(key.digest, presented):
                found = key
        if found is None and not self.allow_anonymous:
            # with anonymous access allowed an unknown key is anonymous: the openai client always sends one
            raise unauthorized("invalid API key")
        return found
