"""Capacity plan: estimates against published figures, verdicts per host x model set, the `vilms plan` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vilms.deploy import capacity_data as data
from vilms.deploy.capacity import vllm_estimate, weights_from_params
from vilms.deploy.capacity_plan import DeclaredMemoryMismatch, Facts, host_memory, plan_host
from vilms.config.load import build_config

ROOT = Path(__file__).resolve().parents[2]

# --- estimates vs published figures (weights, the part a figure is published for) -----------------------------
# (model, how it is served, published size, unit, source). Ollama: the library's download size of the default
# tag (the GGUF the runner loads), recomputed here from the parameter count alone, not read from the tag table.
PUBLISHED = [
    ("qwen2.5:7b", "q4_k_m", 4.7, "GB", "ollama.com/library/qwen2.5:7b, 4.7GB"),
    ("qwen2.5:3b", "q4_k_m", 1.9, "GB", "ollama.com/library/qwen2.5:3b, 1.9GB"),
    ("qwen2.5vl:3b", "q4_k_m", 3.2, "GB", "ollama.com/library/qwen2.5vl:3b, 3.2GB (vision tower at f16)"),
    ("qwen2.5vl:7b", "q4_k_m", 6.0, "GB", "ollama.com/library/qwen2.5vl:7b, 6.0GB (vision tower at f16)"),
    ("qwen3:8b", "q4_k_m", 5.2, "GB", "ollama.com/library/qwen3:8b, 5.2GB"),
    ("qwen3:14b", "q4_k_m", 9.3, "GB", "ollama.com/library/qwen3:14b, 9.3GB"),
    ("llama3.2:3b", "q4_k_m", 2.0, "GB", "ollama.com/library/llama3.2:3b, 2.0GB"),
    ("llama3.2:1b", "q8_0", 1.3, "GB", "ollama.com/library/llama3.2:1b, 1.3GB (the 1b tag is Q8_0)"),
    ("llama3.3:70b", "q4_k_m", 43.0, "GB", "ollama.com/library/llama3.3:70b, 43GB"),
    ("gemma3:4b", "q4_k_m", 3.3, "GB", "ollama.com/library/gemma3:4b, 3.3GB (vision tower at f16)"),
    ("gemma3:12b", "q4_k_m", 8.1, "GB", "ollama.com/library/gemma3:12b, 8.1GB (vision tower at f16)"),
    ("meta-llama/Llama-3.1-8B-Instruct", "vllm", 14.99, "GiB",
     "vLLM startup log on an A10G: 'Loading model weights took 14.99 GiB'"),
    ("Qwen/Qwen2.5-7B-Instruct", "vllm", 14.2409, "GiB",
     "vLLM 0.5.1 startup log: 'Loading model weights took 14.2409 GB' (vLLM's GB = 2**30 bytes)"),
]


def _config(models: list[dict], platform: str = "js", engine: str = "ollama", host: dict | None = None, **extra):
    raw = {"host": {"platform": platform, **(host or {})}, "serving": {"engine": engine, "models": models}, **extra}
    return build_config(raw)


@pytest.mark.parametrize("model,how,size,unit,source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_weights_within_20_percent_of_published(model, how, size, unit, source):
    published_gib = size * data.GB if unit == "GB" else size
    if how == "vllm":
        spec = _config([{"name": model, "engine": "vllm"}], platform="dgpu", engine="vllm").models[0]
        ours = vllm_estimate(_config([{"name": model}], platform="dgpu", engine="vllm"), spec).weights
    else:
        ours = weights_from_params(data.OLLAMA_TAGS[model].arch, how)
    assert abs(ours - published_gib) / published_gib <= 0.20, f"{model}: {ours:.2f} GiB vs {published_gib:.2f} ({source})"


def test_published_figures_cover_eight_models():
    assert len({p[0] for p in PUBLISHED}) >= 8


# --- verdicts: hosts x model sets ------------------------------------------------------------------------------
HOSTS = {
    "nano8": ("js", Facts(device_model="NVIDIA Jetson Orin Nano Developer Kit\x00", meminfo_mib=7620)),
    "nx16": ("js", Facts(device_model="NVIDIA Jetson Orin NX Engineering Reference Developer Kit", meminfo_mib=15663)),
    "agx64": ("js", Facts(device_model="NVIDIA Jetson AGX Orin Developer Kit", meminfo_mib=64335)),
    "gpu24": ("dgpu", Facts(gpu_mib=(24564,), meminfo_mib=65536)),
    "gpu2x80": ("dgpu", Facts(gpu_mib=(81559, 81559), meminfo_mib=524288)),
}


def vllm(name: str, **params) -> dict:
    return {"name": name, "engine": "vllm", "params": params}


def ollama(name: str, **params) -> dict:
    return {"name": name, "engine": "ollama", "params": params}


# (host, models, host overrides, verdict, ok, words every problem text must hold)
CASES = [
    ("nano8", [ollama("qwen2.5vl:3b", **{"num-ctx": 4096})], {}, "fits", True, []),
    ("nano8", [ollama("qwen2.5vl:7b")], {}, "over", False, ["nano8", "qwen2.5vl:7b", "6.2 GiB", "5.5 GiB", ">= 16 GB"]),
    ("nano8", [ollama("llama3.1:8b", **{"num-ctx": 2048})], {}, "tight", False, ["llama3.1:8b", "accept-tight-fit"]),
    ("nano8", [ollama("llama3.1:8b", **{"num-ctx": 2048})], {"accept-tight-fit": True}, "tight", True, []),
    ("nx16", [ollama("qwen2.5vl:7b"), ollama("qwen3:4b")], {}, "fits", True, []),
    ("nx16", [ollama("qwen2.5vl:7b"), ollama("qwen3:8b"), ollama("qwen2.5:7b")], {}, "over", False,
     ["nx16", "13.0 GiB budget", "Jetson Orin NX 16 GB"]),
    ("agx64", [ollama("llama3.3:70b", **{"num-ctx": 8192})], {}, "fits", True, []),
    # Without num-ctx Ollama's default on >= 48 GiB is 256k, capped at the model's 128k: 40 GiB of KV cache.
    ("agx64", [ollama("llama3.3:70b")], {}, "over", False, ["llama3.3:70b", "num-ctx", "131072 tokens"]),
    ("gpu24", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"gpu-memory-utilization": 0.9, "max-model-len": 8192})], {},
     "fits", True, []),
    ("gpu24", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"gpu-memory-utilization": 0.9, "max-model-len": 8192}),
               vllm("Qwen/Qwen2.5-3B-Instruct", **{"gpu-memory-utilization": 0.9, "max-model-len": 8192})], {},
     "over", False, ["GPU 0", "1.80", "sum <= 1"]),
    ("gpu24", [vllm("meta-llama/Llama-3.1-8B-Instruct")], {}, "over", False,
     ["Llama-3.1-8B-Instruct", "131072 tokens", "max-model-len <="]),
    ("gpu24", [ollama("qwen2.5vl:7b", **{"num-ctx": 8192}), ollama("qwen3:8b", **{"num-ctx": 8192})], {},
     "fits", True, []),
    ("gpu24", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"max-model-len": 8192}), ollama("qwen2.5vl:3b")], {},
     "over", False, ["qwen2.5vl:3b", "vLLM reservations"]),
    ("gpu2x80", [vllm("meta-llama/Llama-3.3-70B-Instruct", **{"tensor-parallel-size": 2, "quantization": "fp8",
                                                               "max-model-len": 16384})], {}, "fits", True, []),
    # compose hands every engine all GPUs and a tensor-parallel-size 1 engine takes the first: both on GPU 0.
    ("gpu2x80", [vllm("Qwen/Qwen2.5-7B-Instruct"), vllm("Qwen/Qwen2.5-14B-Instruct")], {}, "over", False,
     ["GPU 0", "1.80"]),
    ("gpu2x80", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"gpu-memory-utilization": 0.45}),
                 vllm("Qwen/Qwen2.5-14B-Instruct", **{"gpu-memory-utilization": 0.45, "max-model-len": 8192})], {},
     "fits", True, []),
    # The 14B's full 32k context leaves under 20% spare in 0.45 of the card: vLLM would start, barely.
    ("gpu2x80", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"gpu-memory-utilization": 0.45}),
                 vllm("Qwen/Qwen2.5-14B-Instruct", **{"gpu-memory-utilization": 0.45})], {}, "tight", False,
     ["Qwen2.5-14B-Instruct", "max-model-len <="]),
    ("gpu2x80", [vllm("Qwen/Qwen2.5-7B-Instruct"), ollama("qwen2.5:72b")], {}, "fits", True, []),
    ("gpu24", [vllm("Qwen/Qwen2.5-7B-Instruct", **{"tensor-parallel-size": 2})], {}, "over", False,
     ["tensor-parallel-size 2", "1 GPU(s)"]),
]


@pytest.mark.parametrize("host,models,overrides,verdict,ok,words", CASES,
                         ids=[f"{c[0]}-{'+'.join(m['name'] for m in c[1])}-{c[3]}" for c in CASES])
def test_verdicts(host, models, overrides, verdict, ok, words):
    platform, facts = HOSTS[host]
    config = _config(models, platform=platform, engine="ollama" if platform == "js" else "vllm", host=overrides)
    plan = plan_host(host, config, host_memory(config, facts))
    assert (plan.verdict, plan.ok) == (verdict, ok), plan.problems
    assert bool(plan.problems) == (verdict != "fits")
    text = " ".join(plan.problems)
    for word in words:
        assert word in text, text


def test_sku_budgets_from_device_tree_and_meminfo():
    budgets = {name: host_memory(_config([]), facts) for name, (platform, facts) in HOSTS.items() if platform == "js"}
    assert {k: (m.unified, m.unified - m.reserve) for k, m in budgets.items()} == {
        "nano8": (8.0, 5.5), "nx16": (16.0, 13.0), "agx64": (64.0, 60.0)}
    # A 4 GB Nano reports ~3.3 GiB MemTotal: the family's smaller size is chosen.
    small = host_memory(_config([]), Facts(device_model="NVIDIA Jetson Orin Nano 4GB", meminfo_mib=3400))
    assert small.unified == 4.0
    # No device tree (or an unknown board): MemTotal minus a generic reserve.
    bare = host_memory(_config([]), Facts(meminfo_mib=24 * 1024))
    assert bare.unified == 24.0 and bare.reserve == pytest.approx(4.8)


def test_inventory_overrides_budget():
    config = _config([ollama("qwen2.5vl:7b")], host={"memory-gb": 8, "os-reserve-gb": 0})
    plan = plan_host("box", config, host_memory(config, HOSTS["nano8"][1]))
    assert plan.pools[0].budget == 8.0 and plan.verdict == "fits"


@pytest.mark.parametrize("host,declared,gpus,ok", [
    ("nano8", 8, None, True),      # the device tree + MemTotal say Orin Nano 8 GB
    ("nano8", 16, None, False),    # a 16 GB declaration on an 8 GB board
    ("nano8", 4, None, False),     # the family's other size
    ("agx64", 64, None, True),
    ("agx64", 32, None, False),
    ("gpu24", 24, None, True),     # nvidia-smi 24564 MiB = 23.99 GiB
    ("gpu24", 26, None, True),     # 8% over: within the tolerance
    ("gpu24", 26.5, None, False),  # 10.5% over
    ("gpu24", 80, None, False),
    ("gpu24", 20, None, False),    # under by 17%: a wrong declaration either way
    ("gpu2x80", 80, 2, True),
    ("gpu2x80", 48, 1, False),
])
def test_a_probe_contradicting_the_declared_memory_stops_the_plan(host, declared, gpus, ok):
    """host.memory-gb is what `vilms plan --inventory` plans with; the preflight's probe checks it (10% tolerance)."""
    platform, facts = HOSTS[host]
    config = _config([], host={"platform": platform, "memory-gb": declared, **({"gpus": gpus} if gpus else {})})
    if ok:
        memory = host_memory(config, facts)
        assert (memory.unified if platform == "js" else memory.gpus[0]) == declared
        assert "(declared; " in memory.description and "agrees" in memory.description
        return
    with pytest.raises(DeclaredMemoryMismatch) as caught:
        host_memory(config, facts)
    message = str(caught.value)
    assert f"declares {declared:g} GB" in message and "more than 10% apart" in message
    probed = {"nano8": "Jetson Orin Nano 8 GB (device tree, MemTotal 7.4 GiB)",
              "agx64": "Jetson AGX Orin 64 GB (device tree, MemTotal 62.8 GiB)",
              "gpu24": "GPU 0 24.0 GiB (nvidia-smi)", "gpu2x80": "GPU 0 79.6 GiB (nvidia-smi)"}[host]
    assert probed in message
    # no probe (vilms plan --inventory, the controller alone): the declaration is all there is
    assert host_memory(config, Facts(gpu=True)).description.endswith(("(declared)", "OS reserve"))


def test_cli_names_the_declared_and_the_probed_memory(tmp_path):
    config = {"host": {"platform": "js", "memory-gb": 16}, "serving": {"engine": "ollama", "models": [
        {"name": "qwen2.5vl:3b", "params": {"num-ctx": 4096}}]}}
    result = _plan(tmp_path, config, "--device-model", "NVIDIA Jetson Orin Nano Developer Kit", "--meminfo-mib", "7620",
                   "--format", "json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["errors"][0]
    assert error["pointer"] == "/host/memory-gb"
    assert "declares 16 GB" in error["message"] and "Jetson Orin Nano 8 GB" in error["message"]
    agreeing = _plan(tmp_path, {**config, "host": {"platform": "js", "memory-gb": 8}}, "--device-model",
                     "NVIDIA Jetson Orin Nano Developer Kit", "--meminfo-mib", "7620")
    assert agreeing.returncode == 0 and "8 GB (declared; the probe agrees)" in agreeing.stdout


def test_declared_memory_wins_and_unknown_warns():
    config = _config([ollama("mystery:2b"), ollama("qwen2.5vl:3b", **{"num-ctx": 4096})])
    plan = plan_host("nano", config, host_memory(config, HOSTS["nano8"][1]))
    assert plan.verdict == "fits" and plan.ok
    assert [m.verdict for m in plan.models] == ["unknown", "fits"]
    assert "memory-gb" in plan.warnings[0] and "/serving/models/0/memory-gb" in plan.warnings[0]
    declared = _config([{"name": "mystery:2b", "memory-gb": 5}, ollama("qwen2.5vl:3b", **{"num-ctx": 4096})])
    plan = plan_host("nano", declared, host_memory(declared, HOSTS["nano8"][1]))
    assert plan.verdict == "over" and plan.models[0].estimate == 5.0 and not plan.warnings


def test_gateway_embeddings_count_on_jetson():
    config = _config([ollama("qwen2.5vl:3b", **{"num-ctx": 4096})],
                     embedding={"enabled": True, "model": "all-MiniLM-L6-v2", "path": "/opt/minilm"})
    plan = plan_host("nano", config, host_memory(config, HOSTS["nano8"][1]))
    pool = plan.pools[0]
    assert "all-MiniLM-L6-v2" in pool.members and "(gateway torch runtime)" in pool.members
    assert pool.estimated == pytest.approx(sum(m.estimate for m in plan.models))


def test_remote_engines_not_counted():
    config = _config([{"name": "qwen2.5vl:72b", "base-url": "http://gpu-a.example:11434"}, ollama("qwen2.5vl:3b")])
    plan = plan_host("nano", config, host_memory(config, HOSTS["nano8"][1]))
    assert plan.remote == ["qwen2.5vl:72b"] and [m.model for m in plan.models] == ["qwen2.5vl:3b"]


def test_rig_dgpu_scenario_fits():
    """The molecule dgpu scenario's models on its stand-in GPU (nvidia-smi prints 81559 MiB)."""
    scenario = yaml.safe_load((ROOT / "molecule/dgpu/molecule.yml").read_text())
    config = build_config(scenario["provisioner"]["inventory"]["group_vars"]["all"]["vilms_config"])
    plan = plan_host("rig", config, host_memory(config, Facts(gpu_mib=(81559,), meminfo_mib=24000)))
    assert plan.ok, plan.problems


# --- the CLI ---------------------------------------------------------------------------------------------------

def _plan(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "vilms", "plan", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_codes_and_json(tmp_path):
    config = {"host": {"platform": "js"}, "serving": {"engine": "ollama", "models": [{"name": "qwen2.5vl:7b"}]}}
    over = _plan(tmp_path, config, "--memory-gb", "8", "--format", "json")
    assert over.returncode == 1
    report = json.loads(over.stdout)
    host = report["hosts"][0]
    assert report["ok"] is False and host["verdict"] == "over"
    assert host["models"][0]["model"] == "qwen2.5vl:7b" and host["models"][0]["verdict"] == "over"
    assert host["models"][0]["estimate_gib"] == pytest.approx(6.21, abs=0.01)
    assert host["pools"][0]["budget_gib"] == 5.5 and host["pools"][0]["headroom_gib"] == pytest.approx(-0.71, abs=0.01)
    fits = _plan(tmp_path, config, "--memory-gb", "16")
    assert fits.returncode == 0 and "qwen2.5vl:7b" in fits.stdout and "fits" in fits.stdout


def test_cli_dgpu_gpus(tmp_path):
    config = {"host": {"platform": "dgpu"}, "serving": {"engine": "vllm", "models": [
        vllm("meta-llama/Llama-3.3-70B-Instruct", **{"tensor-parallel-size": 2, "quantization": "fp8",
                                                      "max-model-len": 16384})]}}
    assert _plan(tmp_path, config, "--memory-gb", "80", "--gpus", "2").returncode == 0
    one = _plan(tmp_path, config, "--memory-gb", "80", "--gpus", "1")
    assert one.returncode == 1 and "tensor-parallel-size 2" in one.stdout


def test_cli_invalid_config_is_an_error(tmp_path):
    result = _plan(tmp_path, {"serving": {"models": [{"name": "x", "memory-gb": -1}]}}, "--memory-gb", "8",
                   "--format", "json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"][0]["pointer"] == "/serving/models/0/memory-gb"


@pytest.mark.ansible
def test_cli_plans_every_host_of_an_inventory(tmp_path):
    """group_vars and host_vars merge as in a run; memory comes from each host's config; no host is contacted."""
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {
        "dgpu": {"hosts": {"gpu-a.invalid": None, "gpu-b.invalid": None, "gpu-c.invalid": None}},
        "jetsons": {"hosts": {"nano.invalid": None}}}}}))
    two_vllm = [vllm("Qwen/Qwen2.5-7B-Instruct", **{"max-model-len": 8192}),
                vllm("Qwen/Qwen2.5-3B-Instruct", **{"max-model-len": 8192})]
    (tmp_path / "group_vars" / "all.yml").write_text(yaml.safe_dump(
        {"vilms_config": {"host": {"platform": "dgpu"}, "serving": {"engine": "vllm", "models": two_vllm}}}))
    (tmp_path / "group_vars" / "jetsons.yml").write_text(yaml.safe_dump({"vilms_config_group": {
        "host": {"platform": "js"}, "serving": {"engine": "ollama", "models": [ollama("qwen2.5vl:3b")]}}}))
    host_vars = {"gpu-a.invalid": {"host": {"memory-gb": 24}}, "nano.invalid": {"host": {"memory-gb": 8}},
                 "gpu-b.invalid": {"host": {"memory-gb": 80, "gpus": 2}, "serving": {"models": [
                     vllm("Qwen/Qwen2.5-7B-Instruct", **{"gpu-memory-utilization": 0.45}),
                     vllm("Qwen/Qwen2.5-3B-Instruct", **{"gpu-memory-utilization": 0.45})]}}}
    for host, config in host_vars.items():
        (tmp_path / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump({"vilms_config_host": config}))
    run = subprocess.run([sys.executable, "-m", "vilms", "plan", "--inventory", str(tmp_path / "hosts.yml"),
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    hosts = {h["host"]: h for h in json.loads(run.stdout)["hosts"]}
    assert {h: r.get("verdict", "error") for h, r in hosts.items()} == {
        "gpu-a.invalid": "over", "gpu-b.invalid": "fits", "gpu-c.invalid": "error", "nano.invalid": "fits"}
    assert "no GPU memory figure" in hosts["gpu-c.invalid"]["errors"][0]
    assert hosts["nano.invalid"]["models"][0]["model"] == "qwen2.5vl:3b"
    limited = subprocess.run([sys.executable, "-m", "vilms", "plan", "--inventory", str(tmp_path / "hosts.yml"),
                              "--limit", "gpu-b.invalid,nano.invalid"], capture_output=True, text=True, timeout=120)
    assert limited.returncode == 0 and "host gpu-b.invalid" in limited.stdout and "gpu-a" not in limited.stdout
