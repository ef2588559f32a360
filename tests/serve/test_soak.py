"""The soak (bench/soak.py) in short: 500 mixed requests at concurrency 32 against a gateway process with keys
and caps on. The full 10,000-request run and its RSS numbers are recorded in bench/results/soak.json."""

from __future__ import annotations

from bench.soak import run


def test_short_soak_has_no_unexpected_errors_and_the_gauge_returns_to_zero(tmp_path):
    result = run(500, 32, tmp_path)
    assert result["unexpected_count"] == 0, result["unexpected"]
    assert result["running_after"] == 0
    assert set(result["statuses"]) == {"chat", "stream", "embed", "bad", "drop_stream", "drop_wait"}
    assert result["statuses"]["chat"] == {"200": 150} and result["statuses"]["stream"] == {"200": 100}
    assert set(result["statuses"]["bad"]) <= {"400", "404"}
