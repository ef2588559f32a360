"""Prometheus metrics (named in vLLM's style) and the one log line per request."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)

REQUESTS = Counter("vilms:requests", "Requests answered, by route, model, engine and HTTP status.",
                   ["route", "model", "engine", "status"], registry=REGISTRY)
LATENCY = Histogram("vilms:e2e_request_latency_seconds", "Whole request latency (stream end for streams).",
                    ["route", "model", "engine"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TTFT = Histogram("vilms:time_to_first_token_seconds", "Time from request to the first streamed chunk.",
                 ["model", "engine"], buckets=_TTFT_BUCKETS, registry=REGISTRY)
UPSTREAM_ERRORS = Counter("vilms:upstream_errors", "Engine failures by kind (connect, timeout, status, stream).",
                          ["model", "engine", "kind"], registry=REGISTRY)
RUNNING = Gauge("vilms:num_requests_running", "Requests in flight.", ["model", "engine"], registry=REGISTRY)
BODY_BYTES = Gauge("vilms:request_body_bytes_held", "Request body bytes the gateway holds now (gateway.max-inflight-body-bytes).",
                   registry=REGISTRY)
EMBED_BATCH = Histogram("vilms:embedding_batch_size", "Sentences per local encode() call.", ["model"],
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY)

log = logging.getLogger("vilms.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                   "msg": record.getMessage()}
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.formatTime(record)} {record.levelname.lower()} {record.name} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("vilms")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class _Running:
    """vilms:num_requests_running of one (model, engine): a plain count kept on the event loop, read when /metrics is
    scraped (Gauge.set_function). The gauge's inc() and dec() took a lock each per request."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_RUNNING: dict[tuple[str, str], _Running] = {}


def _running(model: str, engine: str) -> _Running:
    """One count per gauge child, shared by the routes that serve the model."""
    found = _RUNNING.get((model, engine))
    if found is None:
        count = found = _RUNNING[(model, engine)] = _Running()
        RUNNING.labels(model, engine).set_function(lambda: count.n)
    return found


class _Series:
    """The metric children of one (route, model, engine), looked up once and kept: prometheus_client's `.labels()`
    takes a lock and builds a key on every call, which was a measurable share of a proxied request's CPU."""

    __slots__ = ("running", "latency", "ttft", "by_status", "labels")

    def __init__(self, route: str, model: str, engine: str):
        self.labels = (route, model, engine)
        self.running = _running(model, engine)
        self.latency = LATENCY.labels(route, model, engine)
        self.ttft = TTFT.labels(model, engine)
        self.by_status: dict[int, Any] = {}

    def requests(self, status: int) -> Any:
        child = self.by_status.get(status)
        if child is None:
            child = self.by_status[status] = REQUESTS.labels(*self.labels, str(status))
        return child


_SERIES: dict[tuple[str, str, str], _Series] = {}


def _series(route: str, model: str, engine: str) -> _Series:
    """Bounded by the config (routes x models x engines) and the statuses the gateway answers with."""
    found = _SERIES.get((route, model, engine))
    if found is None:
        found = _SERIES[(route, model, engine)] = _Series(route, model, engine)
    return found


class Observation:
    """One request's measurements; finished exactly once (at stream end for streams)."""

    __slots__ = ("route", "request_id", "model", "engine", "started", "first_chunk", "done", "key", "_series",
                 "_on_finish")

    def __init__(self, route: str, request_id: str, model: str = "-", engine: str = "-"):
        self.route, self.request_id, self.model, self.engine = route, request_id, model, engine
        self.started = time.perf_counter()
        self.first_chunk: float | None = None
        self.done = False
        self.key = ""
        self._series: _Series | None = None  # set by bind(): the request holds a slot in the running gauge
        self._on_finish: list[Callable[[], None]] | None = None

    def bind(self, model: str, engine: str) -> None:
        if self._series is not None:  # bound again (a handler that re-routes): the gauge counts the request once
            self._series.running.n -= 1
        self.model, self.engine = model, engine
        self._series = _series(self.route, model, engine)
        self._series.running.n += 1

    def on_finish(self, release: Callable[[], None]) -> None:
        """Run `release` (a slot, a key's concurrency) when the request ends, on whatever path it ends."""
        if self._on_finish is None:
            self._on_finish = []
        self._on_finish.append(release)

    def chunk(self) -> None:
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
            series = self._series or _series(self.route, self.model, self.engine)
            series.ttft.observe(self.first_chunk - self.started)

    def upstream_error(self, kind: str) -> None:
        UPSTREAM_ERRORS.labels(self.model, self.engine, kind).inc()

    def finish(self, status: int, note: str = "") -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.perf_counter() - self.started
        if self._on_finish:
            for release in self._on_finish:
                release()
        series = self._series
        if series is not None:
            series.running.n -= 1
        else:
            series = _series(self.route, self.model, self.engine)
        series.requests(status).inc()
        series.latency.observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            fields = {"request_id": self.request_id, "route": self.route, "model": self.model, "engine": self.engine,
                      "status": status, "duration_ms": round(elapsed * 1000, 2)}
            if self.first_chunk is not None:
                fields["ttft_ms"] = round((self.first_chunk - self.started) * 1000, 2)
            if note:
                fields["note"] = note
            if self.key:
                fields["key"] = self.key
            # handle(makeRecord()) is log.info() without its caller lookup (a frame walk: ~8 of its ~18 µs);
            # the formatters print no caller, and the logger's filters and handlers still apply
            log.handle(log.makeRecord(log.name, logging.INFO, "", 0, "request", None, None, extra={"fields": fields}))
