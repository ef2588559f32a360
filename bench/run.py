"""The gateway benchmark: direct backend vs vilms (1 and N workers) vs LiteLLM, in one run, same backend.

Latency at c=1 against a 0 ms backend; throughput at c=1/16/64 against a backend holding each reply 20 ms
(the regime of the published peer figures). Streaming: time to first chunk added, chunks in = chunks out.
Peak RSS of each gateway. Embeddings: concurrent one-sentence requests vs one direct encode().
Load comes from wrk (loopback only, bounded by duration). Results go to bench/results/.

    python -m bench.run [--quick] [--duration 8] [--no-litellm] [--no-embeddings]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import free_port, wait_http  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LITELLM_VENV = ROOT / ".cache" / "litellm-venv"
LITELLM_SPEC = "litellm[proxy]==1.108.7"
PY = sys.executable


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.log = open(RESULTS / "raw" / f"{name}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True, cwd=ROOT)

    def pids(self) -> list[int]:
        """The process and all its descendants (uvicorn workers, LiteLLM's children)."""
        pids, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                children = []
            pids += [int(c) for c in children]
            frontier += [int(c) for c in children]
        return pids

    def rss_mb(self, field: str = "VmRSS") -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return round(total / 1024, 1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


BENCH_KEY = "sk-bench-0123456789abcdef"


def wrk(url: str, connections: int, duration: int, body: str, auth: str | None = None) -> dict[str, Any]:
    threads = 1 if connections == 1 else 2
    env = {**os.environ, "BODY": body, **({"AUTH": auth} if auth else {})}
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
                          str(ROOT / "bench" / "post.lua"), url], capture_output=True, text=True,
                         env=env, timeout=duration + 60).stdout
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
    pct = {p: ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)[0]) if "Socket errors" in out else 0
    return {"rps": rps, "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "errors": errors}


async def stream_probe(url: str, model: str, n: int, auth: str | None = None) -> dict[str, Any]:
    """Time to first chunk and chunk counts, one request at a time."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    firsts, events = [], []
    async with aiohttp.ClientSession(headers={"Authorization": auth} if auth else None) as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                first, count = None, 0
                async for chunk in response.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - started
                    count += chunk.count(b"data: ")
            firsts.append(first * 1000)
            events.append(count)
    firsts.sort()
    return {"ttft_p50_ms": firsts[len(firsts) // 2], "ttft_p99_ms": firsts[int(len(firsts) * 0.99) - 1],
            "events": sorted(set(events))}


def ensure_litellm() -> Path | None:
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    print(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (its own venv) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    result = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC])
    return binary if result.returncode == 0 and binary.exists() else None


def run_http(args: argparse.Namespace) -> dict[str, Any]:
    d = args.duration
    ports = {name: free_port() for name in ("b0", "b20", "bst", "v1", "vn", "lite")}
    backends = [Proc("backend-0ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b0"])]),
                Proc("backend-20ms", [PY, "-m", "devkit.mock_backend", "--port", str(ports["b20"]), "--latency-ms", "20"]),
                Proc("backend-stream", [PY, "-m", "devkit.mock_backend", "--port", str(ports["bst"]), "--tokens", "32",
                                        "--token-delay-ms", "1"])]
    base = {name: f"http://127.0.0.1:{ports[key]}" for name, key in (("mock0", "b0"), ("mock20", "b20"), ("mockst", "bst"))}
    procs = list(backends)
    try:
        for name in base:
            wait_http(base[name] + "/v1/models", 30)
        config = {"serving": {"engine": "openai", "base-url": base["mock0"],
                              "models": [{"name": n, "base-url": u} for n, u in base.items()]},
                  "gateway": {"host": "127.0.0.1", "log-level": "warning"}}
        plain = RESULTS / "raw" / "vilms-config.yaml"
        plain.write_text(yaml.safe_dump(config))
        cfg = plain
        if args.secure:  # API keys on, and operator caps on every model (the hot path pays for both)
            secure = {**config, "gateway": {**config["gateway"], "api-keys": [{"name": "bench", "key": BENCH_KEY}]},
                      "serving": {**config["serving"], "models": [
                          {**m, "params": {"max-tokens-cap": 4096, "max-n": 2}} for m in config["serving"]["models"]]}}
            cfg = RESULTS / "raw" / "vilms-secure-config.yaml"
            cfg.write_text(yaml.safe_dump(secure))
        workers = os.cpu_count() or 2
        targets: dict[str, dict[str, Any]] = {"direct": {"url": None}}
        if args.baseline_src:  # the same harness against another checkout's gateway (e.g. main), no keys
            env = {"PYTHONPATH": os.pathsep.join([str(Path(args.baseline_src) / "gateway"), str(args.baseline_src)])}
            targets["before-1w"] = {"proc": Proc("before-1w", [PY, "-m", "vilms", "serve", "--config", str(plain), "--port",
                                                              str(ports["lite"]), "--workers", "1"], env=env),
                                    "url": f"http://127.0.0.1:{ports['lite']}"}
        label = "vilms-1w" + ("-keys" if args.secure else "")
        targets[label] = {"proc": Proc(label, [PY, "-m", "vilms", "serve", "--config", str(cfg), "--port", str(ports["v1"]), "--workers", "1"]),
                          "url": f"http://127.0.0.1:{ports['v1']}", "auth": args.secure}
        if not args.one_worker:
            many = f"vilms-{workers}w" + ("-keys" if args.secure else "")
            targets[many] = {"proc": Proc(many, [PY, "-m", "vilms", "serve", "--config", str(cfg), "--port", str(ports["vn"]), "--workers", str(workers)]),
                             "url": f"http://127.0.0.1:{ports['vn']}", "auth": args.secure}
        litellm = None if args.no_litellm or args.baseline_src else ensure_litellm()
        if litellm:
            lcfg = RESULTS / "raw" / "litellm-config.yaml"
            lcfg.write_text(yaml.safe_dump({"model_list": [
                {"model_name": n, "litellm_params": {"model": f"openai/{n}", "api_base": u + "/v1", "api_key": "none"}}
                for n, u in base.items()], "litellm_settings": {"drop_params": True, "telemetry": False}}))
            targets["litellm"] = {"proc": Proc("litellm", [str(litellm), "--config", str(lcfg), "--port", str(ports["lite"]),
                                                           "--host", "127.0.0.1", "--num_workers", "1"],
                                               env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                                                    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}),
                                  "url": f"http://127.0.0.1:{ports['lite']}"}
        for name, t in targets.items():
            if t.get("proc"):
                procs.append(t["proc"])
                wait_http(t["url"] + ("/health/liveliness" if name == "litellm" else "/health_check"), 120, t["proc"].proc)
        time.sleep(1)
        results: dict[str, Any] = {}
        for name, t in targets.items():
            print(f"measuring {name} ...", flush=True)
            r: dict[str, Any] = {}
            if t.get("proc"):
                r["rss_idle_mb"] = t["proc"].rss_mb()

            def url(model: str) -> str:
                return (t["url"] or base[model]) + "/v1/chat/completions"

            def body(model: str) -> str:
                return json.dumps({"model": model, "max_tokens": 16,
                                   "messages": [{"role": "user", "content": "Say hello in one word."}]})
            auth = f"Bearer {BENCH_KEY}" if t.get("auth") else None
            r["c1_0ms"] = wrk(url("mock0"), 1, d, body("mock0"), auth)
            for c in (1, 16, 64):
                r[f"c{c}_20ms"] = wrk(url("mock20"), c, d, body("mock20"), auth)
            r["stream"] = asyncio.run(stream_probe(url("mockst"), "mockst", 100 if args.quick else 300, auth))
            if t.get("proc"):
                r["rss_peak_mb"] = t["proc"].rss_mb("VmHWM")
            results[name] = r
        return results
    finally:
        for p in procs:
            p.stop()


def run_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    """The embeddings section: bench/embeddings.py's cases for the default gateway and with batching off."""
    from bench.embeddings import run_targets

    return run_targets(["1w", "1w-unbatched"], repeat=1 if args.quick else 3)


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    http = results["http"]
    direct = http["direct"]
    lite = http.get("litellm")
    lines = [f"Machine: {meta['machine']}; {meta['date']}; {meta['duration_s']} s per wrk run.", "",
             "| target | c=1 p50 / p99 ms (0 ms backend) | added p99 ms | c=1 rps | c=16 rps | c=64 rps | c=64 vs direct | c=64 vs LiteLLM | TTFT p50 ms (added) | stream events | RSS idle / peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in http.items():
        added = r["c1_0ms"]["p99_ms"] - direct["c1_0ms"]["p99_ms"]
        vs_direct = r["c64_20ms"]["rps"] / direct["c64_20ms"]["rps"]
        vs_lite = f"{r['c64_20ms']['rps'] / lite['c64_20ms']['rps']:.1f}x" if lite else "-"
        ttft_added = r["stream"]["ttft_p50_ms"] - direct["stream"]["ttft_p50_ms"]
        rss = f"{r.get('rss_idle_mb', '-')} / {r.get('rss_peak_mb', '-')}"
        lines.append(f"| {name} | {r['c1_0ms']['p50_ms']:.2f} / {r['c1_0ms']['p99_ms']:.2f} | {added:+.2f} | "
                     f"{r['c1_20ms']['rps']:.0f} | {r['c16_20ms']['rps']:.0f} | {r['c64_20ms']['rps']:.0f} | "
                     f"{vs_direct:.2f} | {vs_lite} | {r['stream']['ttft_p50_ms']:.2f} ({ttft_added:+.2f}) | "
                     f"{r['stream']['events']} | {rss} |")
    if "embeddings" in results:
        lines += ["", "| embeddings (sentences/s, vs direct encode()) | 64 concurrent 1-sentence requests | 256 concurrent | one request, 256 inputs |",
                  "|---|---|---|---|"]
        for name, row in results["embeddings"].items():
            cells = [f"{row[k]['gateway_sps']} ({row[k]['ratio']:.2f})" for k in ("c64", "c256", "one256")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    from PIL import Image, ImageDraw

    http = results["http"]
    names = list(http)
    values = [http[n]["c64_20ms"]["rps"] for n in names]
    width, height, bar = 640, 360, 90
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 10), "req/s at c=64, backend holds each reply 20 ms (higher is better)", fill="black")
    top = max(values) or 1
    for i, (name, value) in enumerate(zip(names, values)):
        x = 40 + i * (bar + 50)
        h = int((height - 90) * value / top)
        draw.rectangle([x, height - 40 - h, x + bar, height - 40], fill=(70, 110, 200) if "vilms" in name else (160, 160, 160))
        draw.text((x, height - 32), name, fill="black")
        draw.text((x, height - 55 - h), f"{value:.0f}", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 s runs, for checking the harness itself")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-embeddings", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--secure", action="store_true", help="API keys and operator caps on for the vilms targets")
    parser.add_argument("--baseline-src", default=None, help="also measure the gateway of this checkout (before-1w)")
    parser.add_argument("--one-worker", action="store_true", help="skip the one-worker-per-core target")
    parser.add_argument("--stem", default=None, help="result file name (default latest, or quick)")
    args = parser.parse_args()
    if args.quick:
        args.duration = 1
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: run `make system` (Debian package wrk)")
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "duration_s": args.duration}
    results: dict[str, Any] = {"meta": meta, "http": run_http(args)}
    if not args.no_embeddings:
        results["embeddings"] = run_embeddings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("quick" if args.quick else "latest")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    text = table(results, meta)
    (args.out / f"{stem}.md").write_text(text)
    plot(results, args.out / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
