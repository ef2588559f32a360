"""Prometheus metrics (named in vLLM's style) and the one log line per request."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

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
        return json.dumps(payload, separators=(",", ":"))


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


@dataclass
class Observation:
    """One request's measurements; finished exactly once (at stream end for streams)."""

    route: str
    request_id: str
    model: str = "-"
    engine: str = "-"
    started: float = field(default_factory=time.perf_counter)
    first_chunk: float | None = None
    done: bool = False
    key: str = ""
    _running: bool = False
    _on_finish: list[Callable[[], None]] | None = None

    def bind(self, model: str, engine: str) -> None:
        self.model, self.engine = model, engine
        RUNNING.labels(model, engine).inc()
        self._running = True

    def on_finish(self, release: Callable[[], None]) -> None:
        """Run `release` (a slot, a key's concurrency) when the request ends, on whatever path it ends."""
        if self._on_finish is None:
            self._on_finish = []
        self._on_finish.append(release)

    def chunk(self) -> None:
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()
            TTFT.labels(self.model, self.engine).observe(self.first_chunk - self.started)

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
        if self._running:
            RUNNING.labels(self.model, self.engine).dec()
        REQUESTS.labels(self.route, self.model, self.engine, str(status)).inc()
        LATENCY.labels(self.route, self.model, self.engine).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            fields = {"request_id": self.request_id, "route": self.route, "model": self.model, "engine": self.engine,
                      "status": status, "duration_ms": round(elapsed * 1000, 2)}
            if self.first_chunk is not None:
                fields["ttft_ms"] = round((self.first_chunk - self.started) * 1000, 2)
            if note:
                fields["note"] = note
            if self.key:
                fields["key"] = self.key
            log.info("request", extra={"fields": fields})
