"""The cost-per-request benchmark runs end to end on a tiny load and reports every case (no speed assertions:
the figures live in bench/results/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk comes with `make system`")
def test_cost_bench_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.cost", "--quick", "--workers", "2", "--floor",
                             "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "cost-quick.json").read_text())["summary"]
    expected = {"chat direct", "stream direct"}
    expected |= {f"{kind} {target}" for kind in ("chat", "stream") for target in ("after-plain", "after-keys", "floor")}
    expected |= {f"embed-{fmt} after-{layout}" for fmt in ("float", "base64") for layout in ("1w", "1w-shared", "2w-shared")}
    assert set(summary) == expected
    for name, row in summary.items():
        assert row["errors"] == 0 and row["rps"] > 0, (name, row)
        if "direct" not in name:
            assert row["cpu_us_per_request"] > 0, (name, row)  # the gateway's processes were found and measured
    table = (tmp_path / "cost-quick.md").read_text()
    assert "gateway CPU µs / request" in table and "Command: `python -m bench.cost --quick" in table


def test_clients_bench_quick(tmp_path):
    """bench/clients.py (issue #23) runs end to end with the clients the project installs (aiohttp, the httptools
    reference) and reports each one's own CPU per request; the candidates it compares are optional installs."""
    result = subprocess.run([sys.executable, "-m", "bench.clients", "--clients", "aiohttp,raw", "--hold-ms", "0",
                             "--rounds", "1", "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = json.loads((tmp_path / "clients-alone.json").read_text())["runs"]
    assert set(runs) == {"0ms aiohttp", "0ms raw"}
    for name, (row,) in runs.items():
        assert row["errors"] == 0 and row["requests"] > 0 and row["cpu_us_per_request"] > 0, (name, row)
    assert "client CPU µs / request" in (tmp_path / "clients-alone.md").read_text()
