"""OpenAI-style error envelopes with honest status codes."""

from __future__ import annotations

import re
from typing import Any

import orjson

_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b")
_IPV6 = re.compile(r"\[[0-9a-f:.]*:[0-9a-f:.]*(?:%[\w.-]+)?\](?::\d+)?|(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?:%[\w.-]+)?(?![\w:])", re.I)
_HOSTPORT = re.compile(r"\b[a-z](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9_-]+)*:\d{2,5}\b", re.I)
# a dotted host name (redis.internal, vllm-0.svc.cluster.local); the gateway's own setting names are kept
_HOSTNAME = re.compile(r"(?<![\w.@/-])(?!(?:gateway|media|params|embedding|serving)\.)"
                       r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.[a-z][a-z-]{1,62}(?![\w-])(?!\.\w)",
                       re.I)
_PATH = re.compile(r"(?<![\w<>])(?:~|\.{1,2})?/(?:[\w.@+-]+/)*[\w.@+-]+")


def scrub(message: str) -> str:
    """Remove internal URLs, addresses (IPv4, IPv6, host:port, dotted host names) and file paths from text that may
    reach a client."""
    for pattern, token in ((_URL, "<backend>"), (_IPV6, "<backend>"), (_IPV4, "<backend>"), (_HOSTPORT, "<backend>"),
                           (_PATH, "<path>"), (_HOSTNAME, "<backend>")):
        message = pattern.sub(token, message)
    return message


class GatewayError(Exception):
    """Raised anywhere in a request; rendered once as an OpenAI error envelope."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.code = code
        self.param = param

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())

    def sse(self) -> bytes:
        return b"data: " + self.body() + b"\n\n"


class BadRequest(GatewayError):
    status = 400


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str, valid: list[str]):
        super().__init__(f"The model {model!r} does not exist on this gateway. Valid models: {', '.join(valid) or 'none'}",
                         code="model_not_found", param="model")


class BackendError(GatewayError):
    """The engine answered with an error of its own (502), its message kept."""

    status = 502
    type = "upstream_error"


class BackendUnavailable(GatewayError):
    status = 503
    type = "upstream_unavailable"


class BackendTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"


def backend_message(body: bytes) -> str:
    """The engine's own error text from whatever shape it used (OpenAI envelope, Ollama, FastAPI, plain)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return scrub(body.decode("utf-8", "replace").strip()[:500]) or "empty response"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err is not None:
            return scrub(str(err)[:1000])
    return scrub(str(data)[:500])


def from_backend_status(status: int, body: bytes, engine: str) -> GatewayError:
    """Engine 4xx are the caller's fault and keep their status; engine 5xx become 502."""
    message = backend_message(body)
    if status == 404:
        return GatewayError(f"{engine} engine: {message}", status=404, code="model_not_found_on_engine")
    if 400 <= status < 500:
        return GatewayError(f"{engine} engine rejected the request: {message}", status=status if status != 401 else 502,
                            code="engine_rejected")
    return BackendError(f"{engine} engine error ({status}): {message}", code="engine_error")
