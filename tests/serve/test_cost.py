"""Issue #23: the gateway's CPU per proxied chat request, on the stack `vilms serve` runs (vilms.serve.server's
protocol under uvicorn, the factory's app). The figures are in bench/results/cost-*.md (`python -m bench.cost`);
these tests pin what the cuts rely on, each failing on the code before them:

- a served gateway settles its heap once started (before: the collector ran every ~13 requests, walking ~90,000
  start-up objects about once a second, and never found anything to free).
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any, Iterator

import pytest

from tests.support import ThreadedServer, free_port, subprocess_server
from vilms.serve import heap

KEY = "sk-cost-0123456789abcdef"


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    """devkit's mock engine in its own process, so nothing it allocates is counted with the gateway's heap."""
    port = free_port()
    with subprocess_server([sys.executable, "-m", "devkit.mock_backend", "--port", str(port), "--tokens", "4",
                            "--token-delay-ms", "20"], "/v1/models", port) as url:
        yield url


def config(engine: str) -> dict[str, Any]:
    return {"serving": {"engine": "openai", "base-url": engine, "models": [{"name": "m"}]},
            "gateway": {"api-keys": [{"name": "k", "key": KEY}], "log-level": "warning"}}


# --- the heap ----------------------------------------------------------------------------------------------------

def test_a_served_gateway_settles_its_heap_once_started(engine, tmp_path, monkeypatch):
    """Old code left CPython's collector at its default (700): 14% of the served gateway's CPU (perf, c=64)."""
    import yaml

    from vilms.serve.api import factory

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(engine)))
    monkeypatch.setenv("VILMS_CONFIG", str(path))
    threshold, logger = gc.get_threshold(), logging.getLogger("vilms")
    logged = (logger.handlers[:], logger.level, logger.propagate)  # the factory sets up logging as a worker does
    try:
        with ThreadedServer(factory.app()):
            assert gc.get_threshold()[0] == heap.GEN0_THRESHOLD
            assert gc.get_freeze_count() > 10_000  # start-up's objects, out of the collector's walks
            assert gc.isenabled()  # a cycle that does appear is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        logger.handlers[:], logger.level, logger.propagate = logged
