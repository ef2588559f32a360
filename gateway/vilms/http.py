"""The one shared upstream HTTP client, with a pool sized for fan-in from many callers."""

from __future__ import annotations

from typing import Any

import httpx


def make_client(gateway: dict[str, Any]) -> httpx.AsyncClient:
    """One client per process: keep-alive connections are reused across all requests and engines.

    `read` is the longest silence between two upstream bytes (a stream may run long overall);
    the whole-request limit for non-streaming calls is enforced by the caller.
    """
    timeout = httpx.Timeout(connect=gateway["connect-timeout"], read=gateway["read-timeout"],
                            write=gateway["read-timeout"], pool=gateway["connect-timeout"])
    limits = httpx.Limits(max_connections=gateway["max-connections"],
                          max_keepalive_connections=gateway["max-keepalive-connections"],
                          keepalive_expiry=30)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, follow_redirects=False,
                             headers={"user-agent": "vilms-gateway"})
