from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import ThreadedServer, llama_server  # noqa: E402


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
