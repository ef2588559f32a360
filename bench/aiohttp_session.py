"""The aiohttp session the gateway called its engines with until issue #23 (now vilms.serve.upstream); kept as
the bench's reference client (bench/relay_floor.py, bench/clients.py). An aiohttp session with a pool sized for fan-in.

Measured on the 2-core bench machine (bench/README.md): httpx's pool did O(open connections) work per
request (an expiry probe per idle connection) and, with FastAPI's middleware, held the gateway to 240 req/s
at c=64 against a backend doing 3050; sharding httpx into pools of 8 reached 1200. aiohttp's connector
keeps idle connections in a per-host stack, so the cost per request does not grow with the pool.
"""

from __future__ import annotations

from typing import Any

import aiohttp


def make_session(gateway: dict[str, Any]) -> aiohttp.ClientSession:
    """Create inside the running event loop (the gateway does it at start-up).

    `sock_read` is the longest silence between two upstream reads; `total` bounds a whole exchange,
    streams included (gateway.stream-timeout); the tighter limit for non-streaming calls is enforced by
    the engines. `sock_connect`, not `connect`: aiohttp's `connect` also counts the wait for a free pool
    connection, which made a busy pool look like an unreachable engine. Admission control (one queue per
    backend) bounds how many requests wait for the pool.
    """
    # Idle connections are dropped after 4 s: uvicorn-based engines (vLLM, the stand-ins) close theirs after 5 s, and
    # a request written into a connection the engine is closing fails (ClientOSError, a 502 to the caller).
    connector = aiohttp.TCPConnector(limit=gateway["max-connections"], limit_per_host=0,
                                     keepalive_timeout=4, ttl_dns_cache=60, force_close=False)
    timeout = aiohttp.ClientTimeout(total=gateway["stream-timeout"], connect=None,
                                    sock_connect=gateway["connect-timeout"], sock_read=gateway["read-timeout"])
    # Accept-Encoding identity (what no header means) rather than skip_auto_headers: skipping a header makes
    # aiohttp build and merge a header set for every request
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True, trust_env=False,
                                 headers={"User-Agent": "vilms-gateway", "Accept-Encoding": "identity"},
                                 raise_for_status=False)
