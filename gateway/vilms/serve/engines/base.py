"""The small interface every engine adapter implements, plus the upstream plumbing they share."""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import orjson
from starlette.responses import Response, StreamingResponse

from vilms.errors import BackendError, BackendTimeout, BackendUnavailable, GatewayError, from_backend_status, scrub
from vilms.serve.observe import Observation
from vilms.config.routing import Route
from vilms.serve.upstream import (ConnectFailed, DeadlineExceeded, HeadTimeout, Reply, Upstream, UpstreamError,
                                  UpstreamTimeout)

log = logging.getLogger("vilms.gateway")
PROBE_TIMEOUT = 2.0
STREAM_ERRORS = (UpstreamError, TimeoutError)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
JSON = "application/json"
MAX_REPLY_BYTES = 268435456  # gateway.max-reply-bytes
MAX_LINE_BYTES = 16777216  # gateway.max-reply-line-bytes
ERROR_TEXT_CHARS = 1000  # an error message is cut to this before it is scrubbed (as errors.backend_message does)
ERROR_BODY_BYTES = 65536  # an engine's error text: only its first 500-1000 characters are kept anyway


@dataclass
class ChatCall:
    """One chat request after routing: body already names the engine-side model, defaults applied."""

    route: Route
    body: dict[str, Any]
    obs: Observation
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class Listing:
    """What one engine endpoint said: reachable, and the model names it lists (None = not judged by name)."""

    reachable: bool
    names: frozenset[str] | None = None


@dataclass
class EmbedResult:
    vectors: list[list[float]] | Any  # list of lists or a 2-D numpy array
    prompt_tokens: int


class Engine(ABC):
    """An adapter from the gateway's OpenAI-shaped calls to one backend kind."""

    kind: str = "?"
    forwards_request_id: bool = True  # x-request-id to the engine (some OpenAI-compatible servers reject non-UUIDs)

    def __init__(self, upstream: Upstream, total_timeout: float, max_reply: int = MAX_REPLY_BYTES,
                 max_line: int = MAX_LINE_BYTES, stream_timeout: float = math.inf):
        self.upstream = upstream
        self.total_timeout, self.stream_timeout = total_timeout, stream_timeout  # gateway.total-, stream-timeout
        self.max_reply, self.max_line = max_reply, max_line  # gateway.max-reply-bytes, max-reply-line-bytes

    @abstractmethod
    async def chat(self, call: ChatCall) -> Response: ...

    @abstractmethod
    async def embed(self, route: Route, inputs: list[str], dimensions: int | None) -> EmbedResult: ...

    @abstractmethod
    async def complete(self, call: ChatCall) -> Response:
        """POST /v1/completions (legacy text completion), in whatever form this engine takes it."""

    list_path = "/v1/models"
    forwarded: frozenset[str] = frozenset()  # OpenAI paths this engine serves itself (the request passes through)

    async def forward(self, call: ChatCall, path: str) -> Response:
        """POST the body to the engine's own `path`; engines that translate instead have no such route (404)."""
        raise GatewayError(f"{self.kind} engine has no {path} route", status=404, code="model_not_found_on_engine")

    lists_names = False  # False: the engine is judged by `list_path` answering alone (proxies list names their way)

    def listed(self, data: Any) -> frozenset[str]:
        """The model names in the engine's answer at `list_path`."""
        raise NotImplementedError

    def listed_name(self, name: str) -> str:
        """How this engine lists a model the config names (Ollama adds `:latest`)."""
        return name

    async def listing(self, urls: tuple[str, ...]) -> Listing:
        """What the first URL that answers lists; readiness judges each model by it."""
        for url in urls:
            try:
                response = await self.upstream.request(url, self.list_path,
                                                       deadline=self.upstream.loop.time() + PROBE_TIMEOUT)
                if response.status != 200 or not self.lists_names:
                    response.close()
                    if response.status != 200:
                        continue
                    return Listing(True)
                data = orjson.loads(await response.read(self.max_reply))
            except (UpstreamError, ValueError):
                continue
            try:
                return Listing(True, self.listed(data))
            except (KeyError, TypeError):
                return Listing(True, frozenset())
        return Listing(False)

    async def open(self, obs: Observation, urls: tuple[str, ...], path: str, payload: bytes,
                   total: bool = False) -> Reply:
        """POST to the first reachable URL and return the unread response, status checked.

        Fails over only on connection errors: once a backend has taken the request's bytes
        it is never re-sent elsewhere (it may already be generating). With `total`, the whole exchange (every
        attempt, the reply read after) is bounded by total_timeout, a deadline the exchange's one timer judges;
        otherwise (a stream) by stream_timeout, and its head by total_timeout (HeadTimeout, open_with_deadline).
        """
        last: Exception | None = None
        request_id = obs.request_id if self.forwards_request_id and obs.request_id != "-" else None
        now = self.upstream.loop.time()
        if total:
            deadline, head_deadline = now + self.total_timeout, math.inf
        else:
            deadline, head_deadline = now + self.stream_timeout, now + self.total_timeout
        for base in urls:
            try:
                response = await self.upstream.request(base, path, payload, request_id=request_id,
                                                       deadline=deadline, head_deadline=head_deadline)
            except ConnectFailed as exc:
                last = exc
                continue
            except HeadTimeout:
                raise
            except UpstreamError as exc:
                raise self._failure(obs, exc, total) from exc
            if response.status >= 400:
                body = await self._read(obs, response, ERROR_BODY_BYTES, truncate=True, total=total)
                obs.upstream_error("status")
                raise from_backend_status(response.status, body, self.kind)
            return response
        if total and self.upstream.loop.time() >= deadline:
            obs.upstream_error("timeout")
            raise BackendTimeout(f"{self.kind} engine did not finish within {self.total_timeout:g}s") from last
        obs.upstream_error("connect")
        raise BackendUnavailable(f"{self.kind} engine is unreachable ({len(urls)} endpoint(s) tried)",
                                 code="engine_unreachable") from last

    async def _read(self, obs: Observation, response: Reply, limit: int | None = None,
                    truncate: bool = False, total: bool = False) -> bytes:
        """The whole reply, at most `limit` bytes (default max_reply) after decompression: a larger one is a 502
        (or, for error texts, cut). The reply inflates in bounded steps, so a gzip bomb stops at the limit."""
        limit = self.max_reply if limit is None else limit
        chunks, size, complete = [], 0, False
        try:
            async for chunk in response:
                size += len(chunk)
                if size > limit:
                    if truncate:
                        chunks.append(chunk[:len(chunk) - (size - limit)])
                        break
                    obs.upstream_error("too_large")
                    raise BackendError(f"{self.kind} engine reply is larger than {limit} bytes "
                                       "(gateway.max-reply-bytes)", code="engine_reply_too_large")
                chunks.append(chunk)
            else:
                complete = True
        except UpstreamError as exc:
            raise self._failure(obs, exc, total) from exc
        finally:
            if complete:
                response.release()
            else:
                response.close()
        return b"".join(chunks)

    def _failure(self, obs: Observation, exc: BaseException, total: bool = False) -> GatewayError:
        """An upstream failure after the connection was made: 504 when the engine went silent (or, with `total`,
        the exchange outlived total_timeout), else 502."""
        if isinstance(exc, (UpstreamTimeout, TimeoutError)):
            obs.upstream_error("timeout")
            if total and isinstance(exc, DeadlineExceeded):
                return BackendTimeout(f"{self.kind} engine did not finish within {self.total_timeout:g}s")
            return BackendTimeout(f"{self.kind} engine did not answer in time")
        obs.upstream_error("protocol")
        return GatewayError(f"{self.kind} engine connection failed: {type(exc).__name__}", status=502,
                            type="upstream_error")

    async def relay(self, call: ChatCall, upstream: Reply,
                    translate: Callable[[bytes], bytes] | None = None) -> AsyncIterator[bytes]:
        """Relay an engine's stream to the client as its bytes arrive, optionally translated chunk by chunk.

        A translator may raise GatewayError on an engine error line. Any failure mid-stream becomes one SSE
        error event and the stream closes. The `finally` also runs when the client disconnects (the
        generator is cancelled): closing the upstream connection mid-stream stops generation on the engine.
        """
        status, note, complete = 200, "", False
        try:
            async for data in upstream:
                out = translate(data) if translate is not None else data
                if out:
                    call.obs.chunk()
                    yield out
            last = getattr(translate, "flush", None)
            if last is not None and (out := last()):  # a line the engine ended without a newline
                yield out
            complete = True
        except GatewayError as exc:
            call.obs.upstream_error("stream")
            status, note = exc.status, "stream_error"
            partial = getattr(exc, "partial", b"")
            if partial:
                call.obs.chunk()
                yield partial
            yield exc.sse()
        except STREAM_ERRORS as exc:
            call.obs.upstream_error("stream")
            failure = stream_failure(self.kind, exc)
            status, note = failure.status, "stream_error"
            yield failure.sse()
        except Exception:  # a bug or an engine reply of a shape nobody foresaw: still one error event
            log.exception("stream relay failed", extra={"fields": {"request_id": call.obs.request_id,
                                                                   "model": call.obs.model}})
            call.obs.upstream_error("stream")
            failure = BackendError(f"{self.kind} engine stream could not be relayed", code="engine_error")
            status, note = failure.status, "stream_error"
            yield failure.sse()
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
            call.obs.finish(status, note or ("" if call.obs.first_chunk else "empty_stream"))

    async def post_json(self, obs: Observation, urls: tuple[str, ...], path: str, payload: bytes) -> bytes:
        """Non-streaming POST under the total timeout; cancelling it closes the upstream connection.

        The bound is a deadline the exchange's one timer judges (vilms.serve.upstream_conn), not an asyncio.timeout
        around it: two timers per request were ~5% of a proxied chat's gateway CPU (cProfile, c=64)."""
        response = await self.open(obs, urls, path, payload, total=True)
        return await self._read(obs, response, total=True)

    async def open_with_deadline(self, obs: Observation, urls: tuple[str, ...], path: str, payload: bytes) -> Reply:
        """A stream's open: its reply head must come within total_timeout (the exchange's own timer judges it)."""
        try:
            return await self.open(obs, urls, path, payload)
        except HeadTimeout as exc:
            obs.upstream_error("timeout")
            raise BackendTimeout(f"{self.kind} engine did not answer within {self.total_timeout:g}s") from exc


class LineBuffer:
    """Splits an engine's stream at `sep`, holding at most `limit` bytes of an unfinished line (else a 502).

    Why: the converters kept `buffer += data` per chunk, quadratic in a line's length with no bound: a 600 MiB
    line without a newline took 3.1 GB and 437 s of CPU on the event loop. Here each byte is joined once.
    """

    __slots__ = ("limit", "sep", "parts", "size", "kind")

    def __init__(self, limit: int, kind: str, sep: bytes = b"\n"):
        self.limit, self.kind, self.sep = limit, kind, sep
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, data: bytes) -> list[bytes]:
        probe = self.parts[-1][1 - len(self.sep):] + data if self.parts and len(self.sep) > 1 else data
        if self.sep not in probe:
            self.size += len(data)
            if self.size > self.limit:
                raise self._too_long()
            self.parts.append(data)
            return []
        joined = b"".join(self.parts) + data if self.parts else data
        lines = joined.split(self.sep)
        tail = lines.pop()
        if len(tail) > self.limit or any(len(line) > self.limit for line in lines):
            raise self._too_long()
        self.parts, self.size = ([tail], len(tail)) if tail else ([], 0)
        return lines

    def _too_long(self) -> GatewayError:
        return BackendError(f"{self.kind} engine sent a stream line longer than {self.limit} bytes "
                            "(gateway.max-reply-line-bytes)", code="engine_reply_too_large")


_ERROR_KEY = re.compile(rb'"error"\s*:')


class ErrorEvents:
    """An engine's own SSE stream relayed as is, except its error events: their message loses hosts, addresses and
    paths, as every other error the gateway sends does.

    Lines are relayed whole: a line the socket split is held until its newline arrives (engines end every event
    with one, so this is rare and brief), its parts kept as LineBuffer keeps them (each byte joined once, at most
    `limit` bytes), so no part of an error event goes out unscrubbed. Only chunks holding `"error"` are parsed."""

    def __init__(self, limit: int = MAX_LINE_BYTES):
        self.parts: list[bytes] = []
        self.size, self.limit = 0, limit

    def __call__(self, data: bytes) -> bytes:
        if not self.parts and data.endswith(b"\n") and b'"error"' not in data:  # nearly every chunk: two C scans
            return data
        end = data.rfind(b"\n")
        if end < 0:  # the line goes on: held, unless it is longer than any line may be
            self.parts.append(data)
            self.size += len(data)
            return self.flush() if self.size > self.limit else b""
        done = b"".join(self.parts) + data[:end + 1] if self.parts else data[:end + 1]
        tail = data[end + 1:]
        self.parts, self.size = ([tail], len(tail)) if tail else ([], 0)
        return self.lines(done)

    def flush(self) -> bytes:
        """What is held (the engine's last line, when it ended without a newline; or an overlong line)."""
        held = b"".join(self.parts)
        self.parts, self.size = [], 0
        return self.lines(held) if held else b""

    @classmethod
    def lines(cls, data: bytes) -> bytes:
        return b"\n".join(cls.scrubbed(line) for line in data.split(b"\n")) if b'"error"' in data else data

    @staticmethod
    def scrubbed(line: bytes) -> bytes:
        if b'"error"' not in line:
            return line
        payload = line[5:].removeprefix(b" ") if line.startswith(b"data:") else line
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:  # never relayed unread: an unreadable line with an error key becomes one
            if not _ERROR_KEY.search(line):
                return line
            return b"data: " + BackendError("engine stream error", code="engine_error").body()
        return b"data: " + orjson.dumps(scrub_event(event)) if isinstance(event, dict) else line


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """Every error message an OpenAI-shaped stream event can carry, cut to ERROR_TEXT_CHARS and scrubbed: `error`
    (object or string), an event that is itself an error (`type`/`object` "error", Responses' `error` event), a
    failed response's `response.error`."""
    holders = [event] if event.get("type") == "error" or event.get("object") == "error" else []
    error = event.get("error")
    if isinstance(error, str):
        event["error"] = scrub(error[:ERROR_TEXT_CHARS])
    elif isinstance(error, dict):
        holders.append(error)
    response = event.get("response")
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        holders.append(response["error"])
    for holder in holders:
        if isinstance(holder.get("message"), str):
            holder["message"] = scrub(holder["message"][:ERROR_TEXT_CHARS])
    return event


class ObservedStream(StreamingResponse):
    """A stream whose request is finished (and upstream closed) even if its body never started:
    a client that disconnects before the first byte left the generator unstarted, so its `finally`
    never ran and the running gauge and the backend slot leaked."""

    def __init__(self, body: AsyncIterator[bytes], obs: Observation, upstream: Reply):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.obs, self.upstream = obs, upstream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.obs.done:
                self.upstream.close()
                self.obs.finish(499, "client_closed")


def sse_response(body: AsyncIterator[bytes], call: ChatCall | None = None,
                 upstream: Reply | None = None) -> StreamingResponse:
    if call is None or upstream is None:
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    return ObservedStream(body, call.obs, upstream)


def stream_failure(kind: str, exc: BaseException) -> GatewayError:
    if isinstance(exc, (UpstreamTimeout, TimeoutError)):
        return BackendTimeout(f"{kind} engine stream timed out (silent for gateway.read-timeout, or longer than "
                              "gateway.stream-timeout)", code="stream_timeout")
    return GatewayError(f"{kind} engine stream broke: {type(exc).__name__}", status=502, type="upstream_error",
                        code="stream_interrupted")
