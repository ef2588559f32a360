"""The one compose template: dgpu / jetson / cpu / vllm-per-model renders, each accepted by `docker compose config`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from vilms.deploy.compose import render_compose
from vilms.config.load import build_config
from vilms.config.routing import Router

pytestmark = pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI with compose v2 is set up by `make test`")

BASE = {
    "serving": {"engine": "vllm", "models": [
        {"name": "Qwen/Qwen3-4B-Instruct", "path": "/models/qwen3-4b", "aliases": ["LLM"],
         "params": {"gpu-memory-utilization": 0.45, "max-model-len": 8192, "enforce-eager": True, "temperature": 0.7},
         "vllm-args": ["--swap-space", "4"]},
        {"name": "Qwen/Qwen2.5-1.5B-Instruct", "aliases": ["LLM_SMALL"]},
        {"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM"]},
    ]},
    "embedding": {"enabled": True, "model": "all-MiniLM-L6-v2", "path": "/opt/vilms/models/minilm"},
    "docker": {"dns": ["1.1.1.1"], "image": {"ollama": "dustynv/ollama"}, "tag": {"engine": "r36.4.0"}},
}


def compose_config(text: str) -> dict:
    """Parse with the real compose v2 CLI (no daemon needed)."""
    result = subprocess.run(["docker", "compose", "-f", "-", "config", "--format", "json"], input=text, text=True,
                            capture_output=True, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}, timeout=60)
    assert result.returncode == 0, result.stderr
    import json
    return json.loads(result.stdout)


def render(data: dict, **kw) -> dict:
    return compose_config(render_compose(build_config(data), **kw))


def test_dgpu_uses_device_reservations_and_one_vllm_service_per_model():
    out = render({**BASE, "host": {"platform": "dgpu"}}, gpu=True)
    services = out["services"]
    router = Router(build_config(BASE))
    vllm_names = {u.split("//")[1].split(":")[0] for name in ("LLM", "LLM_SMALL") for u in router.resolve(name).base_urls}
    assert vllm_names <= set(services)  # the gateway resolves exactly the services compose creates
    big = services[router.resolve("LLM").base_urls[0].split("//")[1].split(":")[0]]
    assert big["command"][:4] == ["--model", "/models/qwen3-4b", "--served-model-name", "Qwen/Qwen3-4B-Instruct"]
    assert "--gpu-memory-utilization" in big["command"] and "--enforce-eager" in big["command"]
    assert "--temperature" not in big["command"] and big["command"][-2:] == ["--swap-space", "4"]
    devices = big["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "runtime" not in big
    assert not big.get("ports")  # engine ports stay inside the host network
    gw = services["gateway"]
    assert set(gw["depends_on"]) == set(services) - {"gateway"}
    assert all(d["condition"] == "service_healthy" for d in gw["depends_on"].values())
    assert any(v["target"] == "/etc/vilms/config.yaml" and v["read_only"] for v in gw["volumes"])
    assert gw["ports"][0]["published"] == "8989"
    assert services["ollama"]["image"] == "dustynv/ollama:r36.4.0"
    assert gw["dns"] == ["1.1.1.1"]


def test_jetson_uses_nvidia_runtime_not_device_requests():
    out = render({**BASE, "host": {"platform": "js"}}, gpu=True)
    services = out["services"]
    # On Jetson every chat model routes to Ollama (rule 2): no vLLM services at all.
    assert set(services) == {"ollama", "gateway"}
    assert services["ollama"]["runtime"] == "nvidia" and "deploy" not in services["ollama"]


def test_cpu_profile_has_no_gpu_blocks():
    out = render({**BASE, "host": {"platform": "dgpu"}}, gpu=False)
    for svc in out["services"].values():
        assert "runtime" not in svc and "deploy" not in svc


def test_published_engine_ports_bind_loopback_by_default():
    data = {**BASE, "docker": {**BASE["docker"], "publish-engine-ports": True}}
    out = render(data, gpu=False)
    ports = [p for name, s in out["services"].items() if name != "gateway" for p in s.get("ports", [])]
    assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports)


def test_external_urls_render_no_engine_services():
    data = {"serving": {"engine": "openai", "base-url": "http://llm.example:8000", "models": [{"name": "x"}]}}
    out = render(data, gpu=False)
    assert set(out["services"]) == {"gateway"} and "depends_on" not in out["services"]["gateway"]


def test_cli_renders_the_same_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**BASE, "host": {"platform": "dgpu"}}))
    result = subprocess.run([sys.executable, "-m", "vilms", "compose", "--config", str(config), "--gpu", "yes"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_compose(build_config({**BASE, "host": {"platform": "dgpu"}}), gpu=True)


def test_security_defaults_on_every_service():
    out = render({**BASE, "host": {"platform": "dgpu"}}, gpu=True)
    services = out["services"]
    assert set(services) == {"vllm-qwen-qwen3-4b-instruct", "vllm-qwen-qwen2-5-1-5b-instruct", "ollama", "gateway"}
    for name, svc in services.items():
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        assert "cap_add" not in svc and "privileged" not in svc, name
    gw = services["gateway"]
    assert gw["read_only"] is True and gw["pids_limit"] == 4096 and gw["mem_limit"] == str(2 * 1024 ** 3)
    assert services["ollama"]["pids_limit"] == 4096 and "mem_limit" not in services["ollama"]
    for name in ("vllm-qwen-qwen3-4b-instruct", "vllm-qwen-qwen2-5-1-5b-instruct"):
        assert "ipc" not in services[name] and services[name]["shm_size"] == str(8 * 1024 ** 3)


def test_security_settings_come_from_the_docker_section():
    docker = {**BASE["docker"], "ipc-host": True, "shm-size": "1g", "engine-cap-add": ["DAC_OVERRIDE"],
              "engine-memory": "6g", "engine-pids": 512, "gateway-memory": "1g", "gateway-pids": 256}
    services = render({**BASE, "docker": docker}, gpu=False)["services"]
    vllm = services["vllm-qwen-qwen3-4b-instruct"]
    assert vllm["ipc"] == "host" and "shm_size" not in vllm
    assert vllm["cap_add"] == ["DAC_OVERRIDE"] and vllm["cap_drop"] == ["ALL"]
    assert vllm["mem_limit"] == str(6 * 1024 ** 3) and vllm["pids_limit"] == 512
    assert services["gateway"]["mem_limit"] == str(1024 ** 3) and services["gateway"]["pids_limit"] == 256
    assert "cap_add" not in services["gateway"]


def test_seed_service_url_renders_that_service_and_nothing_else():
    data = {"host": {"platform": "dgpu"},
            "serving": {"engine": "ollama", "ollama-base-url": "http://vilms-ollama:11434/v1",
                        "models": [{"name": "qwen2.5:3b", "aliases": ["LLM"]}]}}
    out = render(data, gpu=False)
    assert set(out["services"]) == {"vilms-ollama", "gateway"}
    assert out["services"]["vilms-ollama"]["expose"] == ["11434"]
    assert Router(build_config(data)).resolve("LLM").base_urls == ("http://vilms-ollama:11434",)


def test_named_vllm_service_runs_on_the_urls_port():
    data = {"serving": {"engine": "vllm", "vllm-base-url": "http://vllm:9000/v1", "models": [{"name": "m"}]}}
    services = render(data, gpu=False)["services"]
    assert set(services) == {"vllm", "gateway"}
    assert services["vllm"]["command"][:8] == ["--model", "m", "--served-model-name", "m", "--host", "0.0.0.0",
                                               "--port", "9000"]


def test_gateway_listens_on_the_container_network_whatever_gateway_host_says():
    gw = render({**BASE, "gateway": {"host": "127.0.0.1"}}, gpu=False)["services"]["gateway"]
    assert gw["command"][-2:] == ["--host", "0.0.0.0"]  # else the published port would reach nothing
    assert gw["ports"][0]["host_ip"] == "0.0.0.0"


def test_engine_ports_published_beyond_loopback_warn():
    from vilms.config.routing import semantic_issues

    docker = {**BASE["docker"], "publish-engine-ports": True, "engine-bind": "0.0.0.0"}
    warnings = [i for i in semantic_issues(build_config({**BASE, "docker": docker})) if i.severity == "warning"]
    assert [i.pointer for i in warnings] == ["/docker/engine-bind"]
    assert not semantic_issues(build_config({**BASE, "docker": {**docker, "engine-bind": "127.0.0.1"}}))


@pytest.mark.parametrize("gpu", [True, None])  # the role passes vilms_gpu (yes); left to detection, js means a GPU
def test_jetson_engines_name_runtime_nvidia_themselves(gpu):
    """jetson_runtime no longer makes nvidia the daemon's default runtime: every engine service must ask for it in
    the compose file (the gateway, with no GPU model, stays on the daemon's default), whatever the chat engine."""
    for engine in ("ollama", "vllm"):
        data = {**BASE, "host": {"platform": "js"}, "serving": {**BASE["serving"], "engine": engine}}
        services = render(data, gpu=gpu)["services"]
        engines = {name: svc for name, svc in services.items() if name != "gateway"}
        assert engines and all(svc.get("runtime") == "nvidia" and "deploy" not in svc for svc in engines.values())
        assert "runtime" not in services["gateway"]
