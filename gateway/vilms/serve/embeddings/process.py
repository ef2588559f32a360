"""The shared encoder process: started by `vilms serve` around uvicorn, it loads the local embedding models once and
answers every worker over the Unix socket `shared.EncoderServer` speaks (the wire format is described there).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from vilms.serve.embeddings.build import local_embedders, shared_encoder_wanted
from vilms.serve.embeddings.local import LocalEmbedder
from vilms.serve.embeddings.shared import SOCKET_ENV, EncoderServer, log


def encoder_main(config_path: str, socket_path: str) -> None:
    """Entry point of the encoder process: load every local embedding model, then serve the socket until told to stop."""
    from vilms.config.load import load_config
    from vilms.serve.observe import setup_logging

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
    if not shared_encoder_wanted(config, workers):
        yield
        return
    with encoder_process(os.path.abspath(config.source)) as path:
        os.environ[SOCKET_ENV] = path  # inherited by the uvicorn workers spawned below
        try:
            yield
        finally:
            os.environ.pop(SOCKET_ENV, None)
