"""Interleaved A/B of two gateway checkouts on a busy machine: before (another checkout, no keys) and after (this
one, API keys and operator caps on), same backends, wrk runs alternated A B A B … so load drift hits both alike.

    python -m bench.ab --baseline-src /path/to/main [--rounds 5] [--duration 4]   # writes bench/results/ab.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench.run import BENCH_KEY, PY, RESULTS, Proc, wrk
from tests.support import free_port, wait_http

BODY = json.dumps({"model": "{m}", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in one word."}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    args = parser.parse_args()
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("b0", "b20", "before", "after")}
    procs = [Proc("ab-backend-0ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b0"])]),
             Proc("ab-backend-20ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b20"]), "--latency-ms", "20"])]
    base = {"mock0": f"http://127.0.0.1:{ports['b0']}", "mock20": f"http://127.0.0.1:{ports['b20']}"}
    plain = {"serving": {"engine": "openai", "base-url": base["mock0"], "models": [{"name": n, "base-url": u} for n, u in base.items()]},
             "gateway": {"host": "127.0.0.1", "log-level": "warning"}}
    secure = {"serving": {**plain["serving"], "models": [{"name": n, "base-url": u, "params": {"max-tokens-cap": 4096, "max-n": 2}}
                                                         for n, u in base.items()]},
              "gateway": {**plain["gateway"], "api-keys": [{"name": "bench", "key": BENCH_KEY}]}}
    files = {}
    for name, cfg in (("plain", plain), ("secure", secure)):
        files[name] = RESULTS / "raw" / f"ab-{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": os.pathsep.join([str(Path(args.baseline_src) / "gateway"), args.baseline_src])}
    targets = {
        "direct": (None, None),
        "before": (Proc("ab-before", [PY, "-m", "vilms", "serve", "--config", str(files["plain"]), "--port", str(ports["before"])], env=env), None),
        "after+keys": (Proc("ab-after", [PY, "-m", "vilms", "serve", "--config", str(files["secure"]), "--port", str(ports["after"])]),
                       f"Bearer {BENCH_KEY}"),
    }
    urls = {"before": f"http://127.0.0.1:{ports['before']}", "after+keys": f"http://127.0.0.1:{ports['after']}"}
    procs += [p for p, _ in targets.values() if p]
    rows: dict[str, dict[str, list[float]]] = {t: {"c64_rps": [], "c1_p99_ms": [], "c1_p50_ms": [], "errors": []} for t in targets}
    try:
        for u in base.values():
            wait_http(u + "/v1/models", 30)
        for name, url in urls.items():
            wait_http(url + "/health_check", 60)
        time.sleep(1)
        for _ in range(args.rounds):
            for name, (_, auth) in targets.items():
                root = urls.get(name)
                c64 = wrk((root or base["mock20"]) + "/v1/chat/completions", 64, args.duration, BODY.replace("{m}", "mock20"), auth)
                c1 = wrk((root or base["mock0"]) + "/v1/chat/completions", 1, args.duration, BODY.replace("{m}", "mock0"), auth)
                rows[name]["c64_rps"].append(c64["rps"])
                rows[name]["c1_p99_ms"].append(c1["p99_ms"])
                rows[name]["c1_p50_ms"].append(c1["p50_ms"])
                rows[name]["errors"].append(c64["errors"] + c1["errors"])
    finally:
        for p in procs:
            p.stop()
    med = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in rows.items()}
    lines = [f"Interleaved A/B, {args.rounds} rounds × {args.duration} s per wrk run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Medians over rounds.", "",
             "| target | c=64 rps (20 ms backend) | vs direct | c=1 p50 / p99 ms (0 ms backend) | added p99 ms | errors |",
             "|---|---|---|---|---|---|"]
    for t, m in med.items():
        lines.append(f"| {t} | {m['c64_rps']:.0f} | {m['c64_rps'] / med['direct']['c64_rps']:.2f} | {m['c1_p50_ms']:.2f} / "
                     f"{m['c1_p99_ms']:.2f} | {m['c1_p99_ms'] - med['direct']['c1_p99_ms']:+.2f} | {sum(rows[t]['errors']):.0f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "ab.json").write_text(json.dumps({"rounds": rows, "medians": med}, indent=2))
    (RESULTS / "ab.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
