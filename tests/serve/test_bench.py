"""The benchmark harness runs end to end on a tiny load (no speed assertions: those live in bench/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk comes with `make system`")
def test_bench_harness_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--no-litellm", "--no-embeddings",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    http = data["http"]
    assert {"direct", "vilms-1w"} <= set(http)
    for name, row in http.items():
        assert row["c64_20ms"]["rps"] > 0 and row["c64_20ms"]["errors"] == 0, (name, row)
    # every target relays the same number of SSE events as the backend sends
    assert len({tuple(row["stream"]["events"]) for row in http.values()}) == 1
    assert (tmp_path / "quick.md").read_text().startswith("Machine:")
    assert (tmp_path / "quick.png").stat().st_size > 0
