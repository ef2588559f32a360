from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import ThreadedServer, llama_server, minilm_path  # noqa: E402

RIG = ROOT / "devkit" / "rig" / "rig.sh"


def rig_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "VILMS_RIG_MINILM": minilm_path()}


@pytest.fixture(scope="session")
def rig() -> Iterator[None]:
    """The Docker-in-Docker rig, once per session: a Docker daemon (started here only if none answers, and then
    stopped at the end), the debootstrap base image and the image archives every rig test ships to its hosts.

    Every test that needs Docker depends on this instead of skipping when the daemon is not up yet, so a clean
    machine runs them all (only a machine without root or dockerd skips them).
    """
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("the rig needs root and dockerd (make system)")
    env = rig_env()
    running = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    subprocess.run(["bash", str(RIG), "daemon-up"], check=True, env=env, timeout=120)
    try:
        if os.environ.get("VILMS_RIG_READY") != "1":  # `make test` builds them before pytest (outside any timeout)
            subprocess.run(["bash", str(RIG), "images"], check=True, env=env, timeout=2400)
        yield
    finally:
        if not running:
            subprocess.run(["bash", str(RIG), "daemon-down"], env=env, timeout=120)


@pytest.fixture(scope="session")
def llama_url() -> Iterator[str]:
    """The real llama.cpp engine serving the tiny offline model under the name `tiny-llm`."""
    with llama_server("tiny-llm") as url:
        yield url


@pytest.fixture()
def ollama_standin() -> Iterator[ThreadedServer]:
    """A fresh Ollama-native stand-in per test, with its request log at `.state`."""
    from devkit.ollama_standin import create_app

    app = create_app(["qwen2.5vl:3b", "llama3.2:1b", "nomic-embed-text"], token_delay_ms=0)
    with ThreadedServer(app) as server:
        server.state = app.state.standin
        yield server


@pytest.fixture()
def slow_ollama_standin() -> Iterator[ThreadedServer]:
    from devkit.ollama_standin import create_app

    app = create_app(["qwen2.5vl:3b", "llama3.2:1b"], token_delay_ms=100)
    with ThreadedServer(app) as server:
        server.state = app.state.standin
        yield server
