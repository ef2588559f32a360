"""The gateway's cost per request: CPU microseconds summed over all its processes, beside req/s.

CPU per request moves far less with the machine's load than a req/s ratio does, so it is the figure to drive down.
For each case: utime + stime (from /proc) of the gateway's whole process tree (uvicorn master and workers, the
shared encoder process) before and after one wrk run, divided by the requests wrk completed.

Cases
- chat: a proxied non-stream chat and a streamed chat (16 tokens) at c=64 against devkit/mock_backend holding each
  reply 20 ms; a gateway with keys and caps off ("plain") and on ("keys": one API key, every request authenticated,
  max-tokens-cap and max-n on the model). 1 gateway worker. Direct (wrk to the backend) for the req/s ratio.
- embeddings: one-sentence requests at c=64 through the real batcher, shared-encoder IPC and response path, with a
  stand-in encoder that returns rows of the right shape at once (`bench/standin_gateway.py`), float and base64;
  1 worker in-process, 1 worker + shared encoder, N workers + shared encoder; keys and caps on.
Load: wrk (native, multi-threaded: the load generator is never the limit, unlike one Python process), loopback.
With --baseline-src each target also runs from that checkout ("before"), wrk runs alternated before/after within
every round so load drift hits both alike. Medians over rounds. With --floor the chat cases also measure a bare relay
on the same stack (bench/relay_floor.py: uvicorn, aiohttp, no pipeline): what the gateway costs above it is its own;
--floor-variants adds the same relay over another upstream client or under granian (issue #23, bench/clients.py).

    python -m bench.cost [--baseline-src DIR] [--rounds 3] [--duration 5] [--workers 2,4] [--floor] [--quick]
                         [--floor-variants aiohttp,pyreqwest,raw,aiohttp/granian]
                         [--stem cost]

Writes bench/results/<stem>.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.embeddings import cpu_seconds  # noqa: E402
from bench.run import BENCH_KEY, PY, RESULTS, Proc  # noqa: E402
from tests.support import free_port, minilm_path, wait_http  # noqa: E402

AUTH = f"Bearer {BENCH_KEY}"
CHAT = {"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in one word."}]}
SENTENCE = "the quick brown fox jumps over the lazy dog at the edge"


def wrk_count(url: str, connections: int, duration: float, body: str, auth: str | None) -> dict[str, Any]:
    """One wrk run: requests completed, req/s, errors (non-2xx and socket errors)."""
    env = {**os.environ, "BODY": body, **({"AUTH": auth} if auth else {})}
    run = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "-s", str(ROOT / "bench" / "post.lua"),
                          url], capture_output=True, text=True, env=env, timeout=duration + 60)
    out = run.stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk {url} printed no result: {out[-500:]} {run.stderr[-500:]}")
    done = int(found.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return {"requests": done, "rps": rps, "errors": errors}


def measure(url: str, body: str, auth: str | None, pids: list[int], duration: float) -> dict[str, Any]:
    """wrk at c=64 and the gateway's CPU over the same run: µs per request."""
    before = cpu_seconds(pids)
    result = wrk_count(url, 64, duration, body, auth)
    cpu = cpu_seconds(pids) - before
    result["cpu_us_per_request"] = round(cpu * 1e6 / max(result["requests"], 1), 1)
    result["cores"] = round(cpu / duration, 2)
    return result


def _write(name: str, config: dict[str, Any]) -> Path:
    path = RESULTS / "raw" / f"cost-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def chat_configs(backend: str, log_level: str) -> dict[str, Path]:
    plain = {"serving": {"engine": "openai", "base-url": backend, "models": [{"name": "mock", "base-url": backend}]},
             "gateway": {"host": "127.0.0.1", "log-level": log_level}}
    keys = {"serving": {**plain["serving"], "models": [{"name": "mock", "base-url": backend,
                                                         "params": {"max-tokens-cap": 4096, "max-n": 2}}]},
            "gateway": {**plain["gateway"], "api-keys": [{"name": "bench", "key": BENCH_KEY}]}}
    return {"plain": _write("chat-plain", plain), "keys": _write("chat-keys", keys)}


def embedding_config(name: str, workers: int, encoder: str, log_level: str) -> Path:
    return _write(f"emb-{name}", {
        "serving": {"models": []},
        "gateway": {"host": "127.0.0.1", "log-level": log_level, "workers": workers,
                    "api-keys": [{"name": "bench", "key": BENCH_KEY}]},
        "embedding": {"enabled": True, "model": "minilm", "path": minilm_path(), "encoder": encoder}})


class Gateway:
    """One gateway under test: a name, its process tree, its URL, and whether requests carry the key."""

    def __init__(self, name: str, module: str, config: Path | None, src: str | None, auth: bool,
                 args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = AUTH if auth else None
        env = {"PYTHONPATH": os.pathsep.join([str(Path(src) / "gateway"), str(ROOT)])} if src else None
        args = ["serve", "--config", str(config)] if args is None else args
        self.proc = Proc(f"cost-{name}", [PY, "-m", module, *args, "--port", str(self.port)], env=env)

    def ready(self, path: str, workers: int) -> None:
        wait_http(self.url + path, 120, self.proc.proc)
        for _ in range(4 * workers):  # every worker up (and connected to the encoder) before measuring
            wait_http(self.url + path, 60, self.proc.proc)


def chat_targets(args: argparse.Namespace, backend: str) -> dict[str, Gateway]:
    configs = chat_configs(backend, args.log_level)
    sources = {"after": None, **({"before": args.baseline_src} if args.baseline_src else {})}
    targets = {f"{version}-{mode}": Gateway(f"chat-{version}-{mode}", "vilms", configs[mode], src, mode == "keys")
               for mode in ("plain", "keys") for version, src in sources.items()}
    for variant in args.floor_variants if args.floor else []:  # the stack alone: server, client, kernel
        client, _, server = variant.partition("/")
        name = "floor" + "".join(f"-{part}" for part in (server, client) if part not in ("", "uvicorn", "aiohttp"))
        targets[name] = Gateway(f"chat-{name}", "bench.relay_floor", None, None, False,
                                ["--backend", backend, "--client", client, "--server", server or "uvicorn"])
        targets[name].stream = client != "raw"  # type: ignore[attr-defined]  # (raw relays a stream whole)
    return targets


def embedding_targets(args: argparse.Namespace) -> dict[str, Gateway]:
    layouts = [("1w", 1, "in-process"), ("1w-shared", 1, "shared")]
    layouts += [(f"{n}w-shared", n, "shared") for n in args.workers]
    sources = {"after": None, **({"before": args.baseline_src} if args.baseline_src else {})}
    targets = {}
    for name, workers, encoder in layouts:
        config = embedding_config(name, workers, encoder, args.log_level)
        for version, src in sources.items():
            gateway = Gateway(f"emb-{version}-{name}", "bench.standin_gateway", config, src, True)
            gateway.workers = workers  # type: ignore[attr-defined]
            targets[f"{version}-{name}"] = gateway
    return targets


def run_rounds(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    backend = Proc("cost-backend-20ms", [PY, "-m", "devkit.mock_backend", "--port", str(port), "--latency-ms", "20"])
    base = f"http://127.0.0.1:{port}"
    procs = [backend]
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        wait_http(base + "/v1/models", 30)
        chats = chat_targets(args, base) if "chat" in args.cases else {}
        embs = embedding_targets(args) if "embeddings" in args.cases else {}
        procs += [g.proc for g in (*chats.values(), *embs.values())]
        for g in chats.values():
            g.ready("/health_check", 1)
        for g in embs.values():
            g.ready("/health/ready", g.workers)  # type: ignore[attr-defined]
        time.sleep(1)
        plan = _plan(chats, embs, base)
        for _ in range(args.rounds):
            for key, (url, body, auth, pids) in plan.items():
                rows.setdefault(key, []).append(measure(url, body, auth, pids(), args.duration))
    finally:
        for p in procs:
            p.stop()
    return rows


def _plan(chats: dict[str, Gateway], embs: dict[str, Gateway], base: str) -> dict[str, tuple]:
    """Every (case, target) to run in one round, before and after of one case next to each other."""
    chat, stream = json.dumps(CHAT), json.dumps({**CHAT, "stream": True})
    plan: dict[str, tuple] = {}
    if chats:
        plan["chat direct"] = (base + "/v1/chat/completions", chat, None, lambda: [])
        plan["stream direct"] = (base + "/v1/chat/completions", stream, None, lambda: [])
    for kind, body in (("chat", chat), ("stream", stream)):
        for name, g in chats.items():
            if kind == "stream" and not getattr(g, "stream", True):
                continue
            plan[f"{kind} {name}"] = (g.url + "/v1/chat/completions", body, g.auth, g.proc.pids)
    for fmt in ("float", "base64"):
        body = json.dumps({"model": "minilm", "input": SENTENCE, "encoding_format": fmt})
        for name, g in embs.items():
            plan[f"embed-{fmt} {name}"] = (g.url + "/v1/embeddings", body, g.auth, g.proc.pids)
    return plan


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for key, runs in rows.items():
        out[key] = {"cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in runs),
                    "rps": round(statistics.median(r["rps"] for r in runs), 1),
                    "cores": round(statistics.median(r["cores"] for r in runs), 2),
                    "errors": sum(r["errors"] for r in runs)}
    for key, row in out.items():  # chat ratio against the backend alone, same rounds
        kind = key.split(" ")[0]
        direct = out.get(f"{kind} direct")
        if direct and direct["rps"]:
            row["vs_direct"] = round(row["rps"] / direct["rps"], 2)
    return out


def table(summary: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['date']}, {meta['machine']}, load average {meta['load_before']} before / {meta['load_after']} "
             f"after; {meta['rounds']} rounds x {meta['duration_s']} s per wrk run (c=64), medians; gateway log level "
             f"{meta['log_level']}.",
             f"Command: `{meta['command']}`", "",
             "| case | target | gateway CPU µs / request | req/s | vs direct | gateway cores | errors |",
             "|---|---|---|---|---|---|---|"]
    for key, row in summary.items():
        case, target = key.split(" ", 1)
        cpu = "-" if target == "direct" else f"{row['cpu_us_per_request']:.0f}"
        lines.append(f"| {case} | {target} | {cpu} | {row['rps']:.0f} | {row.get('vs_direct', '-')} | "
                     f"{'-' if target == 'direct' else row['cores']} | {row['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", default=None, help="also run this checkout's gateway (before), interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--workers", default="2", help="worker counts with the shared encoder, e.g. 2,4")
    parser.add_argument("--cases", default="chat,embeddings")
    parser.add_argument("--log-level", default="warning",
                        help="the gateways' log level (info, the config default, adds one access line per request)")
    parser.add_argument("--floor", action="store_true",
                        help="chat cases: also a bare relay on the gateway's stack (bench/relay_floor.py), its floor")
    parser.add_argument("--floor-variants", default="aiohttp",
                        help="with --floor: the relay's upstream client[/server], e.g. aiohttp,pyreqwest,raw,"
                             "aiohttp/granian (bench/clients.py compares the clients alone)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s runs: checks the harness, not the figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None)
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",") if n]
    args.cases = set(args.cases.split(","))
    args.floor_variants = [v for v in args.floor_variants.split(",") if v]
    if args.quick:
        args.rounds, args.duration = 1, 1
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: run `make system` (Debian package wrk)")
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
            "duration_s": args.duration, "log_level": args.log_level, "load_before": round(os.getloadavg()[0], 1),
            "command": "python -m bench.cost " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = run_rounds(args)
    meta["load_after"] = round(os.getloadavg()[0], 1)
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("cost-quick" if args.quick else "cost")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2))
    text = table(summary, meta)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
