"""Soak: many mixed requests at high concurrency against one gateway process; nothing may leak.

Mix: chat, streamed chat, embeddings, bad input (each answered 4xx), and clients that disconnect mid-stream or
before a slow answer. Checked: zero unexpected statuses, `vilms:num_requests_running` back to 0, and the
gateway's RSS growth between the 2nd and the last thousand requests (< 5%). Keys and caps are on.

    python -m bench.soak [--requests 10000] [--concurrency 64]      # writes bench/results/soak.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import free_port, wait_http  # noqa: E402

KEY = "sk-soak-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Say hello."}]
# kind -> (weight, body or raw bytes, headers, statuses that are expected)
BAD = [({"model": "mock", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, {400}),
       ({"model": "mock", "messages": MSG, "top_p": False}, {400}),
       ({"model": "mock", "messages": MSG, "stream": "false"}, {400}),
       ({"model": "nope", "messages": MSG}, {404}),
       ({"model": "mock", "messages": MSG, "n": 99}, {400}),
       ({"model": "mock", "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://x"}}]}]}, {400}),
       ({"model": "embed", "input": "x", "dimensions": True}, {400}),
       (b"{not json", {400}),
       ]


def kinds(i: int) -> str:
    return ("chat", "chat", "chat", "stream", "stream", "embed", "embed", "bad", "drop_stream", "drop_wait")[i % 10]


def rss_mb(pid: int) -> float:
    total = 0.0
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            frontier += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return total


async def one(session: aiohttp.ClientSession, url: str, i: int) -> tuple[str, int | None, bool]:
    """(kind, status, expected?)"""
    kind = kinds(i)
    chat = url + "/v1/chat/completions"
    if kind == "chat":
        async with session.post(chat, json={"model": "mock", "messages": MSG, "max_tokens": 8}, headers=AUTH) as r:
            await r.read()
            return kind, r.status, r.status == 200
    if kind == "stream":
        async with session.post(chat, json={"model": "mock", "messages": MSG, "stream": True}, headers=AUTH) as r:
            body = await r.read()
            return kind, r.status, r.status == 200 and body.endswith(b"data: [DONE]\n\n")
    if kind == "embed":
        async with session.post(url + "/v1/embeddings", json={"model": "embed", "input": ["a", "b"]}, headers=AUTH) as r:
            await r.read()
            return kind, r.status, r.status == 200
    if kind == "bad":
        body, ok = BAD[(i // 10) % len(BAD)]
        path = "/v1/embeddings" if isinstance(body, dict) and "input" in body else "/v1/chat/completions"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(url + path, data=data, headers={**AUTH, "content-type": "application/json"}) as r:
            await r.read()
            return kind, r.status, r.status in ok
    if kind == "drop_stream":  # read the first chunk, then go away
        async with session.post(chat, json={"model": "slow", "messages": MSG, "stream": True}, headers=AUTH) as r:
            await r.content.readany()
            r.close()
            return kind, r.status, r.status == 200
    try:  # drop_wait: give up on a slow non-streamed answer
        async with asyncio.timeout(0.05):
            async with session.post(chat, json={"model": "slow", "messages": MSG}, headers=AUTH) as r:
                await r.read()
                return kind, r.status, r.status == 200
    except TimeoutError:
        return kind, None, True


async def drive(url: str, total: int, concurrency: int, pid: int) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    unexpected: list[str] = []
    rss: list[float] = []
    next_i = 0
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def worker() -> None:
            nonlocal next_i, done
            while next_i < total:
                i = next_i
                next_i += 1
                try:
                    kind, status, ok = await one(session, url, i)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    kind, status, ok = kinds(i), None, False
                    unexpected.append(f"{kinds(i)}: {type(exc).__name__}")
                per = counts.setdefault(kind, {})
                per[str(status)] = per.get(str(status), 0) + 1
                if not ok and status is not None:
                    unexpected.append(f"{kind}: HTTP {status}")
                done += 1
                if done % 1000 == 0:
                    rss.append(round(rss_mb(pid), 1))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        running = await settle(session, url)
    return {"requests": total, "concurrency": concurrency, "seconds": round(elapsed, 1),
            "rps": round(total / elapsed, 1), "statuses": counts, "unexpected": unexpected[:20],
            "unexpected_count": len(unexpected), "running_after": running, "rss_mb_per_1000": rss}


async def settle(session: aiohttp.ClientSession, url: str) -> float:
    """num_requests_running, polled until 0 (abandoned streams finish asynchronously), at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        async with session.get(url + "/metrics", headers=AUTH) as r:
            text = await r.text()
        running = sum(float(v) for v in re.findall(r"^vilms:num_requests_running\{[^}]*\} (\S+)$", text, re.M))
        if running == 0 or time.monotonic() > deadline:
            return running
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[tuple[str, int]]:
    """Two mock engines (fast; slow streams) and one gateway process with keys and caps on."""
    py = sys.executable
    ports = {k: free_port() for k in ("fast", "slow", "gw")}
    procs = [subprocess.Popen([py, "-m", "devkit.mock_backend", "--port", str(ports["fast"]), "--tokens", "8"], cwd=ROOT),
             subprocess.Popen([py, "-m", "devkit.mock_backend", "--port", str(ports["slow"]), "--tokens", "20",
                               "--token-delay-ms", "20", "--latency-ms", "100"], cwd=ROOT)]
    fast, slow = (f"http://127.0.0.1:{ports[k]}" for k in ("fast", "slow"))
    config = {"serving": {"engine": "openai", "models": [
        {"name": "mock", "engine": "openai", "base-url": fast, "params": {"max-tokens-cap": 64, "max-n": 2}},
        {"name": "slow", "engine": "openai", "base-url": slow},
        {"name": "embed", "type": "embedding", "engine": "openai", "base-url": fast}]},
        "gateway": {"host": "127.0.0.1", "log-level": "warning", "api-keys": [{"name": "soak", "key": KEY}]}}
    cfg = workdir / "soak-config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), str(ROOT)])}
    gw = subprocess.Popen([py, "-m", "vilms", "serve", "--config", str(cfg), "--port", str(ports["gw"])], cwd=ROOT,
                          env=env, stderr=subprocess.DEVNULL)
    procs.append(gw)
    try:
        for url in (fast, slow):
            wait_http(url + "/v1/models", 30)
        url = f"http://127.0.0.1:{ports['gw']}"
        wait_http(url + "/health_check", 60, gw)
        yield url, gw.pid
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run(total: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    with stack(workdir) as (url, pid):
        result = asyncio.run(drive(url, total, concurrency, pid))
    rss = result["rss_mb_per_1000"]
    if len(rss) >= 2:
        result["rss_growth_2nd_to_last"] = round(rss[-1] / rss[1] - 1, 4) if len(rss) > 2 else round(rss[-1] / rss[0] - 1, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.requests, args.concurrency, args.out)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
