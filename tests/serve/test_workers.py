"""`gateway.workers: auto` (the default): one worker unless local models run on a GPU, then the cores and the
container's memory decide (vilms.serve.workers); a number is taken as it is, and anything else fails validation."""

from __future__ import annotations

import pytest

from vilms.config.load import build_config
from vilms.config.model import ConfigError
from vilms.serve.workers import ENCODER_BYTES, MAX_AUTO, WORKER_BYTES, auto_workers, local_models_on_gpu, resolve_workers

GIB = 1 << 30


def config(workers=None, device="cpu", embedding=True):
    data = {"serving": {"engine": "openai", "base-url": "http://127.0.0.1:9",
                        "models": [{"name": "m", "type": "llm"}]},
            "embedding": {"enabled": embedding, "model": "all-MiniLM-L6-v2", "device": device}}
    if workers is not None:
        data["gateway"] = {"workers": workers}
    return build_config(data)


@pytest.mark.parametrize("cpus,memory,expected", [
    (2, None, 1),  # a 2-core box: the encoder's core and the host's leave none, still one worker
    (6, None, 4),  # an Orin NX's 6 cores with a GPU encoder
    (16, None, 8), (64, None, MAX_AUTO),  # at most 8
    (16, 2 * GIB, (2 * GIB - ENCODER_BYTES) // WORKER_BYTES),  # docker.gateway-memory 2g holds 3 beside the encoder
    (16, 1 * GIB, 1),  # a limit below the encoder's own share: still one
])
def test_auto_on_a_gpu_host_follows_cores_and_memory(cpus, memory, expected):
    assert auto_workers(True, cpus, memory) == expected


@pytest.mark.parametrize("cpus", [1, 2, 16, 128])
def test_auto_without_gpu_local_models_is_one_worker(cpus):
    assert auto_workers(False, cpus, None) == 1


def test_the_default_is_auto_and_resolves_to_one_worker_for_cpu_and_remote_models():
    for cfg in (config(), config(device="cuda", embedding=False), config(device="cpu")):
        assert cfg.gateway["workers"] == "auto"
        assert resolve_workers(cfg.gateway["workers"], cfg) == 1


def test_only_local_models_on_cuda_count_as_gpu_local():
    assert local_models_on_gpu(config(device="cuda"))
    assert local_models_on_gpu(config(device="cuda:1"))
    assert not local_models_on_gpu(config(device="cpu"))
    assert not local_models_on_gpu(config(device="cuda", embedding=False))


def test_a_number_is_kept_and_bad_values_fail_validation():
    assert resolve_workers(config(workers=3).gateway["workers"], config(workers=3)) == 3
    for bad in (0, "many", 1.5):
        with pytest.raises(ConfigError) as info:
            config(workers=bad)
        assert any(i.pointer == "/gateway/workers" for i in info.value.issues)
