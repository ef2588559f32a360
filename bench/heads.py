"""Which HTTP/1.1 parser for the gateway (issue #21, item 1): httptools as before, httptools behind the head guard
(vilms.serve.server), or h11 with its incomplete-event limit. Same gateway app (one API key, caps on), same
backends; wrk runs interleaved A B C A B C … so load drift hits all alike. CPU per request from /proc.

    python -m bench.heads [--rounds 3] [--duration 4] [--baseline-src DIR]   # bench/results/secure-headers.{json,md}

With --baseline-src (a checkout before issue #21), a fourth target "before" runs that code under plain httptools:
CPU per request is the comparison that holds on a machine other jobs load (req/s there is mostly noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.run import BENCH_KEY, PY, RESULTS, Proc, wrk
from tests.support import free_port, wait_http

BODY = json.dumps({"model": "{m}", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in one word."}]})
LAUNCH = """
import sys, uvicorn
from vilms.config.load import load_config
kind, port = sys.argv[1], int(sys.argv[2])
gw = load_config(sys.argv[3]).gateway
if kind == "guarded":
    from vilms.serve.server import HeadLimits, protocol
    http = protocol(HeadLimits.from_gateway(gw))
else:
    http = {"httptools": "httptools", "h11": "h11", "before": "httptools"}[kind]
uvicorn.run("vilms.serve.api.factory:app", factory=True, host="127.0.0.1", port=port, loop="uvloop", http=http,
            access_log=False, log_level="warning", timeout_keep_alive=30, backlog=4096, h11_max_incomplete_event_size=65536)
"""
KINDS = ("httptools", "guarded", "h11")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--baseline-src", default=None)
    args = parser.parse_args()
    kinds = KINDS + (("before",) if args.baseline_src else ())
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("b0", "b20", *kinds)}
    procs = [Proc("heads-backend-0ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b0"])]),
             Proc("heads-backend-20ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b20"]), "--latency-ms", "20"])]
    base = {"mock0": f"http://127.0.0.1:{ports['b0']}", "mock20": f"http://127.0.0.1:{ports['b20']}"}
    config = {"serving": {"engine": "openai", "base-url": base["mock0"],
                          "models": [{"name": n, "base-url": u, "params": {"max-tokens-cap": 4096, "max-n": 2}}
                                     for n, u in base.items()]},
              "gateway": {"host": "127.0.0.1", "log-level": "warning", "api-keys": [{"name": "bench", "key": BENCH_KEY}]}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gw.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {"VILMS_CONFIG": str(path)}
        base = {"PYTHONPATH": os.pathsep.join([str(Path(args.baseline_src or ".") / "gateway"), str(args.baseline_src)])}
        gws = {k: Proc(f"heads-{k}", [PY, "-c", LAUNCH, k, str(ports[k]), str(path)],
                       {**env, **(base if k == "before" else {})}) for k in kinds}
        procs += gws.values()
        try:
            for k in kinds:
                wait_http(f"http://127.0.0.1:{ports[k]}/health_check", 60)
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            auth = f"Bearer {BENCH_KEY}"
            for _ in range(args.rounds):
                for k in kinds:
                    url = f"http://127.0.0.1:{ports[k]}/v1/chat/completions"
                    before = cpu_seconds(gws[k].pids())
                    hi = wrk(url, 64, args.duration, BODY.replace("{m}", "mock20"), auth)
                    spent = cpu_seconds(gws[k].pids()) - before
                    lo = wrk(url, 1, args.duration, BODY.replace("{m}", "mock0"), auth)
                    runs[k].append({"c64_rps": hi["rps"], "cpu_us_per_req": spent / max(hi["rps"] * args.duration, 1) * 1e6,
                                    "c1_p50_ms": lo["p50_ms"], "c1_p99_ms": lo["p99_ms"],
                                    "errors": hi["errors"] + lo["errors"]})
        finally:
            for p in procs:
                p.proc.terminate()
            for p in procs:
                p.proc.wait(10)
    summary = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds, "duration": args.duration,
            "loadavg": os.getloadavg()[0], "python": sys.version.split()[0]}
    (RESULTS / "secure-headers.json").write_text(json.dumps({"meta": meta, "runs": runs, "median": summary}, indent=1))
    lines = [f"Parser choice, keys + caps on; {args.rounds} interleaved rounds x {args.duration} s per wrk run, "
             f"{meta['when']}, load average at end {meta['loadavg']:.1f}. Medians over rounds.", "",
             "| parser | c=64 rps (20 ms backend) | gateway CPU µs / request (c=64) | c=1 p50 / p99 ms (0 ms backend) | errors |",
             "|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['c64_rps']:.0f} | {s['cpu_us_per_req']:.0f} | {s['c1_p50_ms']:.2f} / {s['c1_p99_ms']:.2f} "
                     f"| {s['errors']:.0f} |")
    (RESULTS / "secure-headers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
