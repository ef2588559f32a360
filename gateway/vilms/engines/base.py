"""The small interface every engine adapter implements, plus the upstream plumbing they share."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from starlette.responses import Response, StreamingResponse

from ..errors import BackendTimeout, BackendUnavailable, GatewayError, from_backend_status
from ..observe import Observation
from ..routing import Route

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class ChatCall:
    """One chat request after routing: body already names the engine-side model, defaults applied."""

    route: Route
    body: dict[str, Any]
    obs: Observation
    stream: bool = False
    include_usage: bool = False


@dataclass
class EmbedResult:
    vectors: list[list[float]] | Any  # list of lists or a 2-D numpy array
    prompt_tokens: int


class Engine(ABC):
    """An adapter from the gateway's OpenAI-shaped calls to one backend kind."""

    kind: str = "?"

    def __init__(self, client: httpx.AsyncClient, total_timeout: float):
        self.client = client
        self.total_timeout = total_timeout

    @abstractmethod
    async def chat(self, call: ChatCall) -> Response: ...

    @abstractmethod
    async def embed(self, route: Route, inputs: list[str], dimensions: int | None) -> EmbedResult: ...

    @abstractmethod
    async def ready(self, base_url: str) -> bool: ...

    async def open(self, call_obs: Observation, urls: tuple[str, ...], path: str, payload: bytes) -> httpx.Response:
        """POST to the first reachable URL and return the streaming response, status checked.

        Fails over only on connection errors: once a backend has taken the request's bytes
        it is never re-sent elsewhere (it may already be generating).
        """
        last: Exception | None = None
        for base in urls:
            request = self.client.build_request("POST", base + path, content=payload, headers=JSON_HEADERS)
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
                continue
            except httpx.TimeoutException as exc:
                call_obs.upstream_error("timeout")
                raise BackendTimeout(f"{self.kind} engine did not answer in time") from exc
            except httpx.HTTPError as exc:
                call_obs.upstream_error("protocol")
                raise GatewayError(f"{self.kind} engine connection failed: {type(exc).__name__}", status=502,
                                   type="upstream_error") from exc
            if response.status_code >= 400:
                body = await response.aread()
                await response.aclose()
                call_obs.upstream_error("status")
                raise from_backend_status(response.status_code, body, self.kind)
            return response
        call_obs.upstream_error("connect")
        raise BackendUnavailable(f"{self.kind} engine is unreachable ({len(urls)} endpoint(s) tried)",
                                 code="engine_unreachable") from last

    async def read_all(self, obs: Observation, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.TimeoutException as exc:
            obs.upstream_error("timeout")
            raise BackendTimeout(f"{self.kind} engine did not answer in time") from exc
        except httpx.HTTPError as exc:
            obs.upstream_error("protocol")
            raise GatewayError(f"{self.kind} engine broke the connection: {type(exc).__name__}", status=502,
                               type="upstream_error") from exc
        finally:
            await response.aclose()

    async def post_json(self, obs: Observation, urls: tuple[str, ...], path: str, payload: bytes) -> bytes:
        """Non-streaming POST under the total timeout."""
        try:
            async with asyncio.timeout(self.total_timeout):
                response = await self.open(obs, urls, path, payload)
                return await self.read_all(obs, response)
        except TimeoutError as exc:
            obs.upstream_error("timeout")
            raise BackendTimeout(f"{self.kind} engine did not finish within {self.total_timeout:g}s") from exc

    async def open_with_deadline(self, obs: Observation, urls: tuple[str, ...], path: str, payload: bytes) -> httpx.Response:
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self.open(obs, urls, path, payload)
        except TimeoutError as exc:
            obs.upstream_error("timeout")
            raise BackendTimeout(f"{self.kind} engine did not answer within {self.total_timeout:g}s") from exc


def sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def stream_failure(kind: str, exc: BaseException) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{kind} engine went silent mid-stream", code="stream_timeout")
    return GatewayError(f"{kind} engine stream broke: {type(exc).__name__}", status=502, type="upstream_error",
                        code="stream_interrupted")
