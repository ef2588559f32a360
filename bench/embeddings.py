"""Local embeddings through the gateway vs one direct `SentenceTransformer.encode()` of the same sentences.

Cases (sentences/s, best of --repeat): n concurrent one-sentence requests (n = 64, 256) and ONE request carrying
256 inputs, each against a direct encode() of the same sentences measured right before it (best over batch sizes
32 / 64 / n, so the baseline is the strongest one-call encode). Gateway targets: 1 worker in-process (the default),
1 worker + shared encoder process, 2 workers + shared encoder, 2 workers with a replica each, 1 worker unbatched.
Peak RSS (VmHWM) of each gateway's process tree, encoder process included. Load: aiohttp on loopback.

    python -m bench.embeddings [--targets 1w,2w-shared] [--repeat 3] [--runs 3] [--sweep] [--profile SECONDS]

Writes bench/results/embeddings.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run import PY, RESULTS, Proc  # noqa: E402
from tests.support import free_port, minilm_path, wait_http  # noqa: E402

TARGETS = {  # name: (workers, embedding settings)
    "1w": (1, {}),
    "1w-shared": (1, {"encoder": "shared"}),
    "2w-shared": (2, {"encoder": "shared"}),
    "2w-replicas": (2, {"encoder": "in-process"}),
    "1w-unbatched": (1, {"batching": False}),
}
WORDS = ("the a gateway model fleet jetson edge image server quick brown fox jumps over lazy dog serves answer "
         "token stream batch").split()


def sentences(n: int, seed: int = 1) -> list[str]:
    """Short varied sentences (6-14 words), the same ones every run (and as in ../shared/gpu-embed-check)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def direct_best(model: Any, texts: list[str], repeat: int) -> tuple[float, float]:
    """Seconds of the fastest direct encode() of `texts` (best over batch sizes and repeats), and its CPU seconds."""
    best, cpu = float("inf"), 0.0
    for batch in sorted({32, 64, len(texts)}):
        for _ in range(repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            model.encode(texts, batch_size=batch)
            took = time.perf_counter() - started
            if took < best:
                best, cpu = took, time.process_time() - cpu_started
    return best, cpu


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes (all their threads), from /proc."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


async def _fire(url: str, bodies: list[bytes], repeat: int, pids: list[int] | None = None) -> tuple[float, float]:
    """Best wall time of sending all `bodies` at once (each checked for a 200), and the CPU seconds `pids` spent on
    the timed rounds (the warm-up excluded)."""
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                assert response.status == 200, payload[:300]
        await asyncio.gather(*(one(b) for b in bodies[:8]))  # open connections, warm up
        best, cpu = float("inf"), cpu_seconds(pids or [])
        for _ in range(repeat):
            started = time.perf_counter()
            await asyncio.gather(*(one(b) for b in bodies))
            best = min(best, time.perf_counter() - started)
        return best, cpu_seconds(pids or []) - cpu


def start_gateway(name: str, workers: int, settings: dict[str, Any]) -> tuple[Proc, str]:
    port = free_port()
    config = {"serving": {"models": []}, "gateway": {"host": "127.0.0.1", "log-level": "warning", "workers": workers},
              "embedding": {"enabled": True, "model": "minilm", "path": minilm_path(), **settings}}
    path = RESULTS / "raw" / f"emb-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Proc(f"emb-{name}", [PY, "-m", "vilms", "serve", "--config", str(path), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/ready", 300, proc.proc)
    for _ in range(4 * workers):  # every worker connected / loaded before measuring
        wait_http(url + "/health/ready", 60, proc.proc)
    return proc, url


def measure_target(model: Any, name: str, repeat: int, profile: float = 0.0) -> dict[str, Any]:
    workers, settings = TARGETS[name] if name in TARGETS else _sweep_target(name)
    proc, url = start_gateway(name, workers, settings)
    endpoint = url + "/v1/embeddings"
    row: dict[str, Any] = {"workers": workers, "settings": settings}
    try:
        row["rss_loaded_mb"] = proc.rss_mb()
        cases = [("c64", 64, False), ("c256", 256, False), ("one256", 256, True)]
        for key, n, single in cases:
            texts = sentences(n)
            direct, direct_cpu = direct_best(model, texts, repeat)
            bodies = ([orjson.dumps({"model": "minilm", "input": texts})] if single else
                      [orjson.dumps({"model": "minilm", "input": t}) for t in texts])
            if profile and key == "c256":
                _profile(proc, name, profile, endpoint, bodies)
            took, cpu = asyncio.run(_fire(endpoint, bodies, repeat, proc.pids()))
            row[key] = {"direct_sps": round(n / direct, 1), "gateway_sps": round(n / took, 1),
                        "ratio": round(direct / took, 3),
                        "cpu_ms_per_sentence": {"direct": round(direct_cpu / n * 1000, 3),
                                                "gateway": round(cpu / (n * repeat) * 1000, 3)}}
        row["rss_peak_mb"] = proc.rss_mb("VmHWM")
    finally:
        proc.stop()
    return row


CATEGORIES = [  # first match from the innermost frame outwards names the sample
    ("tokenizer", ("tokenizers", "tokenization_utils", "_features", "preprocess (sentence_transformers")),
    ("model forward", ("torch/nn/", "transformers/models", "sentence_transformers/base/modules")),
    ("response JSON / base64", ("embedding_body", "_embedding_response", "_base64_body", "orjson")),
    ("request parse + validate", ("parse_json", "validated", "read_body", "texts_from_input", "_texts (", "pydantic")),
    ("batcher + encoder glue", ("batcher.py", "local.py", "encoder.py", "shared.py", "sentence_transformers")),
    ("HTTP server (uvicorn, starlette)", ("uvicorn", "httptools", "starlette", "fastapi")),
    ("event loop", ("asyncio", "uvloop", "concurrent/futures", "threading.py")),
]


IDLE = {"Condition.wait", "Event.wait", "_worker", "Runner.run", "asyncio_run", "Server.run", "run_forever",
        "select", "Thread._bootstrap_inner", "BaseEventLoop.run_forever"}


def _profile(proc: Proc, name: str, seconds: float, endpoint: str, bodies: list[bytes]) -> None:
    """py-spy over every process of the gateway while the case repeats for `seconds`; writes a category summary."""
    out = RESULTS / "raw" / f"profile-{name}"
    pids = proc.pids()
    spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                               "--nonblocking", "--format", "raw", "--output", f"{out}-{pid}.txt"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
    time.sleep(1.0)  # let py-spy attach
    sent, deadline, cpu = 0, time.monotonic() + seconds - 1.5, cpu_seconds(pids)
    while time.monotonic() < deadline:
        asyncio.run(_fire(endpoint, bodies, 1))
        sent += len(bodies) + min(8, len(bodies))
    cpu = cpu_seconds(pids) - cpu
    for spy in spies:
        spy.wait(120)
    samples: dict[str, int] = {}
    for pid in pids:
        path = Path(f"{out}-{pid}.txt")
        if path.exists():
            for category, count in _categorise(path.read_text()).items():
                samples[category] = samples.get(category, 0) + count
    total = sum(samples.values()) or 1
    # Python-thread time per category from the samples; the model forward also runs on torch's native threads,
    # which py-spy does not see, so it gets what the measured CPU total leaves over.
    per_sentence = cpu / sent * 1000
    split = {k: v / 250 / sent * 1000 for k, v in samples.items() if k != "model forward"}
    split["model forward (CPU total minus the rest)"] = per_sentence - sum(split.values())
    summary = {"sentences": sent, "cpu_ms_per_sentence": round(per_sentence, 3), "samples": total,
               "ms_per_sentence": {k: round(v, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}}
    (RESULTS / f"profile-{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


def _categorise(raw: str) -> dict[str, int]:
    """Samples per category from py-spy's raw (collapsed stack) output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].split(" (")[0] in IDLE:  # a thread parked in a wait or the loop's C poll: not work
            continue
        category = "other"
        for frame in reversed(frames):
            match = next((c for c, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if match:
                category = match
                break
        counts[category] = counts.get(category, 0) + int(number)
    return counts


def run_targets(names: list[str], repeat: int, profile: float = 0.0, model: Any = None) -> dict[str, Any]:
    """Each named gateway measured in turn (ratios against direct encodes taken just before each case)."""
    if model is None:
        from sentence_transformers import SentenceTransformer

        (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
        model = SentenceTransformer(minilm_path(), device="cpu")
        model.encode(sentences(64))
    targets = {}
    for name in names:
        print(f"  {name} ...", flush=True)
        targets[name] = measure_target(model, name, repeat, profile)
        targets[name]["load"] = round(os.getloadavg()[0], 2)
        print("  " + json.dumps(targets[name]), flush=True)
    return targets


def _sweep_target(name: str) -> tuple[int, dict[str, Any]]:
    _, size, wait, *forward = name.split("-")  # sweep-<size>-<wait>[-<forward pass size>]
    return 1, {"max-batch-size": int(size), "max-wait-ms": float(wait),
               **({"forward-batch-size": int(forward[0])} if forward else {})}


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"Machine: {meta['machine']}; {meta['date']}; best of {meta['repeat']}; load before: {meta['load']}.", "",
             "| run | target | 64 concurrent s/s (vs direct) | 256 concurrent s/s (vs direct) | one request, 256 inputs s/s (vs direct) | RSS loaded / peak MB | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for run, targets in enumerate(results["runs"], 1):
        for name, row in targets.items():
            cells = [f"{row[k]['gateway_sps']} ({row[k]['ratio']:.2f})" for k in ("c64", "c256", "one256")]
            lines.append(f"| {run} | {name} | {' | '.join(cells)} | {row['rss_loaded_mb']} / {row['rss_peak_mb']} | "
                         f"{row.get('load', '-')} |")
    lines += ["", "| target | 64 concurrent | 256 concurrent | one request, 256 inputs |", "|---|---|---|---|"]
    for name in results["runs"][0]:
        spread = []
        for k in ("c64", "c256", "one256"):
            ratios = [targets[name][k]["ratio"] for targets in results["runs"] if name in targets]
            spread.append(f"{min(ratios):.2f}-{max(ratios):.2f}")
        lines.append(f"| {name} (vs direct, min-max over runs) | {' | '.join(spread)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="1w,1w-shared,2w-shared,2w-replicas,1w-unbatched")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--sweep", action="store_true",
                        help="1 worker over max-batch-size x max-wait-ms x forward-batch-size")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy each gateway for this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="embeddings")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the gateways it started
    from sentence_transformers import SentenceTransformer

    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.encode(sentences(64))
    names = ([f"sweep-{s}-{w}-{f}" for s in (64, 128, 256) for w in (3, 6, 12) for f in (32, 64) if f <= s]
             if args.sweep
             else args.targets.split(","))
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "repeat": args.repeat, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    results: dict[str, Any] = {"meta": meta, "runs": []}
    for run in range(args.runs):
        print(f"run {run + 1} (load {os.getloadavg()[0]:.2f})", flush=True)
        results["runs"].append(run_targets(names, args.repeat, args.profile, model))
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (args.out / f"{args.stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
