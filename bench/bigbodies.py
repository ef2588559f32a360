"""Large bodies against the event loop: does /health_check keep answering while maximum-size bodies are processed?

A 1-worker `vilms serve` (uvloop + httptools, as deployed) in front of devkit/mock_backend. For each kind of body,
`--concurrency` (8) copies are sent at once, each on its own connection, while a separate process polls
`/health_check` every `--interval-ms` (5) on a kept-alive connection. Reported per kind: the worst, p99 and p50
`/health_check` latency during the attack, the statuses, the attack's wall time and the gateway's CPU seconds.

Kinds, each close to gateway.max-request-bytes (default 64 MiB):
- images: chat with one text part and 3 base64 data URLs (PNG, JPEG, PNG of noise, each ~15.6 MiB decoded, under
  media.max-bytes 20 MiB): decoded, verified, resized to 1024 px and re-encoded by the gateway, forwarded small.
- text: chat with one huge text content string (prose with escapes and non-ASCII), forwarded as it came.
- many: chat of 6000 messages x 10 text parts of ~1.1 KiB, ~198,000 JSON values (under max-json-nodes 200,000).

The gateway's body budget is raised (gateway.max-inflight-body-bytes / max-key-body-bytes 1 GiB) so that all the
bodies are processed at once, the worst case an operator can configure; with the defaults (256 / 128 MiB) at most
two 64 MiB bodies per key are held and the rest are refused (429).

`--attribute` instead times, in this process, each step the gateway's old road runs on one body of each kind (one
call each, best of 3): the longest single call that holds the GIL is the least a loop that runs or waits for it
stalls.

    python -m bench.bigbodies [--kinds images,text,many] [--rounds 2] [--baseline-src DIR] [--stem bigbodies]
    python -m bench.bigbodies --attribute

Writes bench/results/<stem>.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.embeddings import cpu_seconds  # noqa: E402
from bench.run import PY, RESULTS, Proc  # noqa: E402
from tests.support import free_port, wait_http  # noqa: E402

CHAT = "/v1/chat/completions"
MIB = 2**20
KINDS = ("images", "text", "many")


# --- the bodies ---------------------------------------------------------------------------------------------------

def noise_image(fmt: str, target: int) -> bytes:
    """An incompressible image (random pixels) of about `target` bytes: the worst case per byte for the decoder."""
    import numpy as np
    from PIL import Image

    per_pixel = 3.0 if fmt == "PNG" else 2.2  # noise: PNG stores it raw, JPEG q95 4:4:4 keeps ~2.2 bytes a pixel
    side = int((target / per_pixel) ** 0.5)
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    options = {"compress_level": 1} if fmt == "PNG" else {"quality": 95, "subsampling": 0}
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def images_body(size: int) -> bytes:
    each = int(size * 0.96 / 4)  # three base64 payloads (4/3 of the bytes each) filling the body
    png, jpeg = noise_image("PNG", each), noise_image("JPEG", each)
    parts = [{"type": "text", "text": "Describe these images."}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(raw, mime)}}
              for raw, mime in ((png, "image/png"), (jpeg, "image/jpeg"), (png, "image/png"))]
    return orjson.dumps({"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": parts}]})


def text_body(size: int) -> bytes:
    line = 'Le "chat" dort près de la fenêtre; 猫は窓のそばで眠る. The quick brown fox jumps over the lazy dog.\n'
    text = line * (size // (len(orjson.dumps(line)) - 2) - 2)  # as JSON: quotes and newlines escaped
    return orjson.dumps({"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": text}]})


def many_body(size: int) -> bytes:
    messages, parts = 6000, 10  # 6000 x (10 parts x 3 + 3) values: ~198,000 of max-json-nodes 200,000
    width = size // (messages * parts) - 40
    words = ("lorem ipsum dolor sit amet " * (width // 27 + 1))[:width]
    content = [{"type": "text", "text": words} for _ in range(parts)]
    return orjson.dumps({"model": "mock", "max_tokens": 16,
                         "messages": [{"role": "user", "content": content}] * messages})


def bodies(kinds: list[str], size: int) -> dict[str, bytes]:
    makers = {"images": images_body, "text": text_body, "many": many_body}
    return {kind: makers[kind](size) for kind in kinds}


# --- the prober (its own process: the senders' GIL never delays it) ----------------------------------------------

def probe(port: int, interval: float, stop: Any, out: Any) -> None:
    """GET /health_check on one kept-alive connection every `interval` s until `stop`; sends [(start, seconds)]."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, samples = b"GET /health_check HTTP/1.1\r\nhost: bench\r\n\r\n", []
    while not stop.is_set():
        started = time.perf_counter()
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or not _complete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("gateway closed the probe connection")
            reply += chunk
        samples.append((started, time.perf_counter() - started))
        time.sleep(interval)
    sock.close()
    out.send(samples)


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


class Prober:
    def __init__(self, port: int, interval: float):
        context = multiprocessing.get_context("spawn")
        self.stop, (self.receiver, sender) = context.Event(), context.Pipe(duplex=False)
        self.proc = context.Process(target=probe, args=(port, interval, self.stop, sender), daemon=True)

    def __enter__(self) -> "Prober":
        self.proc.start()
        return self

    def samples(self) -> list[tuple[float, float]]:
        self.stop.set()
        samples = self.receiver.recv()
        self.proc.join(10)
        return samples

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.proc.join(10)


# --- one attack ---------------------------------------------------------------------------------------------------

def post(port: int, body: bytes, start: threading.Barrier) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.connect()
        start.wait()
        conn.request("POST", CHAT, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError as exc:
        return 0, repr(exc).encode()
    finally:
        conn.close()


def attack(port: int, body: bytes, concurrency: int, pids: list[int], interval: float) -> dict[str, Any]:
    """Send `concurrency` copies of `body` at once while probing: health latency during the attack, statuses, CPU."""
    results: list[tuple[int, bytes]] = []
    start = threading.Barrier(concurrency + 1)
    senders = [threading.Thread(target=lambda: results.append(post(port, body, start))) for _ in range(concurrency)]
    with Prober(port, interval) as prober:
        time.sleep(0.5)  # the prober's connection is open and warm
        cpu = cpu_seconds(pids)
        for sender in senders:
            sender.start()
        start.wait()
        began = time.perf_counter()
        for sender in senders:
            sender.join()
        ended = time.perf_counter()
        cpu = cpu_seconds(pids) - cpu
        time.sleep(0.1)
        samples = prober.samples()
    during = sorted(lag for at, lag in samples if began <= at + lag and at <= ended)
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"health_worst_ms": round(during[-1] * 1000, 1) if during else None,
            "health_p99_ms": round(_quantile(during, 0.99) * 1000, 1) if during else None,
            "health_p50_ms": round(_quantile(during, 0.5) * 1000, 2) if during else None,
            "probes": len(during), "statuses": statuses, "seconds": round(ended - began, 2),
            "gateway_cpu_s": round(cpu, 2), "errors": sorted({r[1][:300].decode(errors="replace")
                                                               for r in results if r[0] != 200})[:3]}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def idle(port: int, interval: float, seconds: float = 1.5) -> dict[str, Any]:
    """The same probe with nothing else sent: the machine's own noise right now."""
    with Prober(port, interval) as prober:
        time.sleep(seconds)
        lags = sorted(lag for _, lag in prober.samples()[5:])
    return {"health_worst_ms": round(lags[-1] * 1000, 1), "health_p99_ms": round(_quantile(lags, 0.99) * 1000, 1),
            "health_p50_ms": round(_quantile(lags, 0.5) * 1000, 2), "probes": len(lags)}


# --- the run ------------------------------------------------------------------------------------------------------

def gateway_config(backend: str) -> dict[str, Any]:
    return {"serving": {"engine": "openai", "base-url": backend, "models": [{"name": "mock", "type": "vlm", "engine": "openai"}]},
            "gateway": {"host": "127.0.0.1", "log-level": "warning", "max-inflight-body-bytes": 2**30,
                        "max-key-body-bytes": 2**30}}


def start_gateway(name: str, config: Path, src: Path | None) -> tuple[Proc, int]:
    port = free_port()
    env = None if src is None else {"PYTHONPATH": os.pathsep.join([str(src / "gateway"), str(src)])}
    proc = Proc(name, [PY, "-m", "vilms", "serve", "--config", str(config), "--port", str(port), "--workers", "1"],
                env=env)
    wait_http(f"http://127.0.0.1:{port}/health_check", 60)
    return proc, port


def run(args: argparse.Namespace) -> dict[str, Any]:
    made = bodies(args.kinds, args.mib * MIB)
    sizes = {kind: len(body) for kind, body in made.items()}
    backend_port = free_port()
    procs = [Proc("bigbodies-backend", [PY, "-m", "devkit.mock_backend", "--port", str(backend_port)])]
    results: dict[str, Any] = {"sizes": sizes, "targets": {}}
    try:
        wait_http(f"http://127.0.0.1:{backend_port}/v1/models", 30)
        config = RESULTS / "raw" / "bigbodies-config.yaml"
        config.write_text(yaml.safe_dump(gateway_config(f"http://127.0.0.1:{backend_port}")))
        sources = {"after": None} if args.baseline_src is None else {"before": args.baseline_src, "after": None}
        gateways = {}
        for label, src in sources.items():
            proc, port = start_gateway(f"bigbodies-{label}", config, src)
            procs.append(proc)
            gateways[label] = (proc, port)
        interval = args.interval_ms / 1000
        for label in gateways:
            results["targets"][label] = {"idle": [], **{kind: [] for kind in made}}
        for _ in range(args.rounds):
            for kind, body in made.items():
                for label, (proc, port) in gateways.items():  # before and after alternate: load drift hits both
                    results["targets"][label]["idle"].append(idle(port, interval))
                    row = attack(port, body, args.concurrency, proc.pids(), interval)
                    results["targets"][label][kind].append(row)
                    print(label, kind, json.dumps(row), flush=True)
    finally:
        for proc in procs:
            proc.stop()
    return results


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"{meta['date']}, {meta['machine']}, load average {meta['load_before']} before / {meta['load_after']} "
             f"after. Command: `{meta['command']}`", "",
             f"{meta['concurrency']} concurrent bodies per kind, /health_check polled every {meta['interval_ms']} ms "
             "from its own process; one row per round.", "",
             "| gateway | kind | body MiB | /health_check worst ms | p99 ms | p50 ms | probes | statuses | seconds | "
             "gateway CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in results["targets"].items():
        for kind, runs in rows.items():
            size = "-" if kind == "idle" else f"{results['sizes'][kind] / MIB:.1f}"
            for row in runs:
                statuses = " ".join(f"{n}×{s}" for s, n in sorted(row.get("statuses", {}).items())) or "-"
                lines.append(f"| {label} | {kind} | {size} | {row['health_worst_ms']} | {row['health_p99_ms']} | "
                             f"{row['health_p50_ms']} | {row['probes']} | {statuses} | {row.get('seconds', '-')} | "
                             f"{row.get('gateway_cpu_s', '-')} |")
    return "\n".join(lines) + "\n"


# --- attribution --------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], rounds: int = 3) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000, value


def attribute(made: dict[str, bytes]) -> dict[str, dict[str, float]]:
    """Each step of the old road, one call each (ms, best of 3): the read's join, orjson.loads, the strict chat
    model, base64 of one image, Pillow (decode, resize, re-encode), orjson.dumps of the forwarded body."""
    import binascii

    from vilms.serve.api.requests import ChatRequest
    from vilms.serve.media import ImageLimits, process_image

    context = {"max_parts": 256, "max_messages": 10000, "max_tools": 128}
    steps: dict[str, dict[str, float]] = {}
    for kind, raw in made.items():
        chunks = [raw[i:i + 65536] for i in range(0, len(raw), 65536)]
        row = {"join of 64 KiB chunks": timed(lambda: b"".join(chunks))[0]}
        row["orjson.loads"], data = timed(lambda: orjson.loads(raw))
        row["ChatRequest.model_validate"] = timed(lambda: ChatRequest.model_validate(data, context=context))[0]
        if kind == "images":
            payload = data["messages"][0]["content"][1]["image_url"]["url"].partition(",")[2]
            row["base64 decode, one image"], image = timed(lambda: binascii.a2b_base64(payload))
            row["base64 decode, 4 MiB slice"] = timed(lambda: binascii.a2b_base64(payload[:4 * MIB]))[0]
            limits = ImageLimits(max_frames=8, max_side=1024, max_pixels=16777216)
            row["Pillow decode+resize+encode (GIL released)"] = timed(lambda: process_image(image, limits), 2)[0]
            for part in data["messages"][0]["content"][1:]:
                part["image_url"]["url"] = "data:image/jpeg;base64," + "A" * 200_000  # what gets forwarded
        row["orjson.dumps of the forwarded body"] = timed(lambda: orjson.dumps(data))[0]
        steps[kind] = {name: round(ms, 1) for name, ms in row.items()}
        print(kind, json.dumps(steps[kind]), flush=True)
    return steps


def attribution_table(steps: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['date']}, {meta['machine']}, load average {meta['load_before']}. Command: `{meta['command']}`",
             "", "| kind | step | ms (one call, best of 3) |", "|---|---|---|"]
    for kind, row in steps.items():
        lines += [f"| {kind} | {name} | {ms} |" for name, ms in row.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: images, text, many")
    parser.add_argument("--mib", type=int, default=64, help="body size (gateway.max-request-bytes: 64 MiB)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--baseline-src", type=Path, default=None, help="also measure the gateway of this checkout")
    parser.add_argument("--attribute", action="store_true", help="time each step in this process instead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="result file name (default bigbodies, or bigbodies-attribution)")
    args = parser.parse_args()
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}")
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                       f"Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": round(os.getloadavg()[0], 1),
            "command": "python -m bench.bigbodies " + " ".join(sys.argv[1:]), "concurrency": args.concurrency,
            "interval_ms": args.interval_ms}
    if args.attribute:
        results: dict[str, Any] = {"meta": meta, "steps": attribute(bodies(args.kinds, args.mib * MIB))}
        text = attribution_table(results["steps"], meta)
        stem = args.stem or "bigbodies-attribution"
    else:
        results = {"meta": meta, **run(args)}
        meta["load_after"] = round(os.getloadavg()[0], 1)
        text = table(results, meta)
        stem = args.stem or "bigbodies"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
