"""One encoder process shared by every gateway worker, over a Unix socket.

With several uvicorn workers, per-worker model replicas split the concurrent callers between them (smaller batches)
and load the model once per worker (on a GPU: one CUDA context and one copy of the weights per worker). Instead,
`vilms serve` starts one encoder process that holds the model and the batcher; each worker keeps one connection to
it and sends its requests' texts; the encoder batches across all workers and answers with the raw float32 rows.

Frames (little-endian): request = u32 length, u32 id, then orjson `[model, [texts...]]` (model "" = hello, answered
with orjson `{model: dimension}`). Reply = u32 length, u32 id, i32 status (0 = ok, else the HTTP status of an
error whose message is the payload), u32 rows, then rows int32 token counts and rows x dimension float32 values.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from ..errors import GatewayError
from .local import LocalEmbedder, check_dimensions, shorten

SOCKET_ENV = "VILMS_ENCODER_SOCKET"
REQUEST = struct.Struct("<II")
REPLY = struct.Struct("<IIiI")
log = logging.getLogger("vilms.embeddings")


def _unavailable(message: str) -> GatewayError:
    return GatewayError(message, status=503, type="upstream_unavailable", code="embedding_model_unavailable")


class EncoderServer:
    """Serves the local embedders of this process to gateway workers (runs in the encoder process)."""

    def __init__(self, embedders: dict[str, LocalEmbedder]):
        self.embedders = embedders

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                length, rid = REQUEST.unpack(await reader.readexactly(REQUEST.size))
                payload = await reader.readexactly(length)
                task = asyncio.create_task(self._answer(rid, payload, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, rid: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            model, texts = orjson.loads(payload)
            if model == "":
                body = orjson.dumps({name: e.dimension for name, e in self.embedders.items()})
                writer.write(REPLY.pack(len(body), rid, 0, 0) + body)
                return
            embedder = self.embedders.get(model)
            if embedder is None:
                raise _unavailable(f"the encoder process does not serve {model!r}")
            vectors, counts = await embedder.batcher.submit(texts)
        except GatewayError as exc:
            message = exc.message.encode()
            writer.write(REPLY.pack(len(message), rid, exc.status, 0) + message)
            return
        except Exception as exc:  # a malformed frame or an encode bug: the caller gets a 500, the server lives on
            message = f"encoder process: {type(exc).__name__}: {exc}".encode()
            writer.write(REPLY.pack(len(message), rid, 500, 0) + message)
            return
        counts32 = counts.astype("<i4")
        writer.write(REPLY.pack(counts32.nbytes + vectors.nbytes, rid, 0, len(counts32)))
        writer.write(memoryview(counts32).cast("B"))
        writer.write(memoryview(np.ascontiguousarray(vectors, dtype="<f4")).cast("B"))


class EncoderClient:
    """One connection from a gateway worker to the encoder process, shared by all its requests (multiplexed by id)."""

    def __init__(self, path: str):
        self.path = path
        self.dimensions: dict[str, int | None] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader_task: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        async with self._lock:
            if self.connected:
                return
            try:
                reader, self._writer = await asyncio.open_unix_connection(self.path)
            except OSError as exc:  # the path stays in the log, not in the client's error
                log.error("embedding encoder unreachable", extra={"fields": {"socket": self.path, "error": str(exc)}})
                raise _unavailable("the embedding encoder process is not reachable") from exc
            self._reader_task = asyncio.create_task(self._read(reader), name="embed-encoder-client")
            hello = await self._call(b'["",[]]')
            self.dimensions = orjson.loads(hello[1])

    async def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.connected:
            await self.connect()
        rows, body = await self._call(orjson.dumps([model, texts]))
        counts = np.frombuffer(body, dtype="<i4", count=rows)
        vectors = np.frombuffer(body, dtype="<f4", offset=rows * 4).reshape(rows, -1)
        return vectors, counts

    async def _call(self, payload: bytes) -> tuple[int, bytes]:
        rid = next(self._ids) & 0xFFFFFFFF
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        assert self._writer is not None
        self._writer.write(REQUEST.pack(len(payload), rid) + payload)
        try:
            return await future
        finally:
            self._pending.pop(rid, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                length, rid, status, rows = REPLY.unpack(await reader.readexactly(REPLY.size))
                body = await reader.readexactly(length)
                future = self._pending.get(rid)
                if future is None or future.done():
                    continue
                if status:
                    future.set_exception(GatewayError(body.decode(errors="replace"), status=status,
                                                      type="server_error" if status >= 500 else "invalid_request_error"))
                else:
                    future.set_result((rows, body))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if self._writer is not None:
                self._writer.close()
            error = _unavailable("the embedding encoder process closed the connection")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


class SharedEmbedder:
    """A gateway worker's handle on one model served by the shared encoder process (same interface as LocalEmbedder)."""

    kind = "shared"

    def __init__(self, name: str, client: EncoderClient, source: str = ""):
        self.name = name
        self.client = client
        self.source = source  # what the encoder process loads; readiness checks its files are there

    @property
    def model(self) -> object | None:
        """Readiness's view (api/readiness.py): set once the encoder process has this model loaded."""
        return self if self.ready else None

    @property
    def ready(self) -> bool:
        return self.client.connected and self.name in self.client.dimensions

    @property
    def dimension(self) -> int | None:
        return self.client.dimensions.get(self.name)

    async def load(self) -> None:
        await self.client.connect()

    async def probe(self) -> str:
        """Readiness: "ready" once the encoder process answers with this model loaded, else "unreachable"."""
        try:
            await asyncio.wait_for(self.client.connect(), timeout=2.0)
        except (GatewayError, asyncio.TimeoutError, OSError):
            return "unreachable"
        return "ready" if self.ready else "missing"

    async def embed(self, texts: list[str], dimensions: int | None = None, matryoshka: bool = False
                    ) -> tuple[np.ndarray, int]:
        if not self.client.connected:
            await self.client.connect()
        check_dimensions(self.name, self.dimension, dimensions, matryoshka)
        vectors, counts = await self.client.embed(self.name, texts)
        return shorten(vectors, dimensions), int(counts.sum())

    async def aclose(self) -> None:
        await self.client.aclose()


# ---- the encoder process -------------------------------------------------------------------------------------------

def encoder_main(config_path: str, socket_path: str) -> None:
    """Entry point of the encoder process: load every local embedding model, then serve the socket until told to stop."""
    from ..config import load_config
    from ..observe import setup_logging
    from .build import local_embedders

    config = load_config(config_path)
    setup_logging(os.environ.get("VILMS_LOG_FORMAT") or config.gateway["log-format"], config.gateway["log-level"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us in order
    asyncio.run(_serve(local_embedders(config), socket_path, os.getppid()))


async def _serve(embedders: dict[str, LocalEmbedder], socket_path: str, parent: int) -> None:
    for embedder in embedders.values():
        await embedder.load()
    server = await asyncio.start_unix_server(EncoderServer(embedders).handle, path=socket_path)
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        while not stop.is_set() and os.getppid() == parent:  # exit with the gateway, even if it was SIGKILLed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    for embedder in embedders.values():
        await embedder.aclose()


@contextlib.contextmanager
def encoder_process(config_path: str, timeout: float = 600.0) -> Iterator[str]:
    """Start the encoder process, wait until its models are loaded and the socket answers; yield the socket path."""
    folder = tempfile.mkdtemp(prefix="vilms-encoder-")
    path = str(Path(folder) / "encoder.sock")
    process = multiprocessing.get_context("spawn").Process(target=encoder_main, args=(config_path, path),
                                                             name="vilms-encoder", daemon=True)
    process.start()
    try:
        _wait_for_socket(path, process, timeout)
        yield path
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _wait_for_socket(path: str, process: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            log.error("the embedding encoder process exited before serving; local embeddings will answer 503")
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            return
        time.sleep(0.1)
    log.error("the embedding encoder process did not start in time; local embeddings will answer 503")


@contextlib.contextmanager
def shared_encoder(config: Any, workers: int) -> Iterator[None]:
    """Around `uvicorn.run`: when the config wants a shared encoder, run it and tell the workers where it listens."""
    from .build import shared_encoder_wanted

    if not shared_encoder_wanted(config, workers):
        yield
        return
    with encoder_process(os.path.abspath(config.source)) as path:
        os.environ[SOCKET_ENV] = path  # inherited by the uvicorn workers spawned below
        try:
            yield
        finally:
            os.environ.pop(SOCKET_ENV, None)
