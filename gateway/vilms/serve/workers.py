"""How many gateway worker processes `gateway.workers: auto` (the default) starts.

Why not always one per core: every per-key limit and fair share (max in flight, a key's share of a backend, of the
body budget) is counted per worker process, and a proxied chat costs the gateway ~250 µs of CPU, so one worker's
core carries ~4,000 chats/s, more than any LLM engine on one box answers. One worker is the right default there.
The one place a worker's CPU is the limit is local embeddings on a GPU: the issue #23 measurements on an H200
(1 worker ~2,500 one-sentence requests/s at ~450 µs each against a card that encodes 19,700 sentences/s; 4 workers
with the shared encoder ~5,900/s) and on the 2-core VM (~100-140 µs per request after the cuts, bench/README.md:
more workers than cores cost more per request). So `auto` starts several workers, with one shared encoder process,
only when local models run on a CUDA device: one per core left after the encoder process's core and one for the host
(the engine's own CPU work, the OS), at most 8, and no more than the container's memory limit holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MAX_AUTO = 8
WORKER_BYTES = 160 << 20  # RSS a worker adds beside the shared encoder (bench: +133 MB per worker with MiniLM)
ENCODER_BYTES = 1536 << 20  # the encoder process with a CUDA context and a small model (torch's CUDA libraries)
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: the container's mem_limit (docker.gateway-memory)
CGROUP_CPU = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: a `cpus:` quota, if one is set


def auto_workers(gpu_local: bool, cpus: int, memory: int | None) -> int:
    """Workers for `auto`: 1 unless local models run on a GPU; then cores − 2, at most MAX_AUTO, within memory."""
    if not gpu_local:
        return 1
    count = min(MAX_AUTO, cpus - 2)
    if memory is not None:
        count = min(count, (memory - ENCODER_BYTES) // WORKER_BYTES)
    return max(1, count)


def resolve_workers(setting: int | str, config: Any) -> int:
    """`gateway.workers` as a number of processes, judged on this host (inside its container) at start-up."""
    if setting != "auto":
        return int(setting)
    return auto_workers(local_models_on_gpu(config), usable_cpus(), memory_limit())


def local_models_on_gpu(config: Any) -> bool:
    """Whether this gateway encodes with local models on a CUDA device (its own CPU per request then limits)."""
    from vilms.serve.embeddings.build import device_kind, local_routes

    return device_kind(config.embedding["device"]) == "cuda" and bool(local_routes(config))


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup CPU quota (compose `cpus:`)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU.read_text().split()
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count


def memory_limit() -> int | None:
    """The container's memory limit in bytes (None: no limit, or not cgroup v2)."""
    try:
        text = CGROUP_MEMORY.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)
