"""Render docker-compose.yaml from a config: the one template, used by `vilms compose` and the Ansible role.

Python decides *what* runs (which engines, names, commands, GPU mode); the template only lays it out.
Service names come from routing (`vllm_service_name`), so the gateway always finds its engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .config import Config
from .params import vllm_cli_args
from .adapters import vllm_lora_args
from .routing import OLLAMA_DEFAULT_URL, VLLM_PORT, Router, vllm_service_name

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "docker-compose.yaml.j2"
GATEWAY_CONFIG_PATH = "/etc/vilms/config.yaml"


@dataclass
class EngineService:
    name: str
    image: str
    port: int
    command: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)
    host_port: int | None = None
    models: list[str] = field(default_factory=list)
    kind: str = "vllm"


def gpu_mode(platform: str, gpu: bool | None) -> str:
    """'runtime' (Jetson: CSV mode, --gpus does not work), 'devices' (dgpu reservations) or 'none'."""
    if gpu is None:
        gpu = platform == "js" or shutil.which("nvidia-smi") is not None or os.path.exists("/etc/nv_tegra_release")
    if not gpu:
        return "none"
    return "runtime" if platform == "js" else "devices"


def _image(config: Config, kind: str) -> str:
    docker = config.docker
    repo = docker["image"][kind]
    tag = docker["tag"].get({"ollama": "engine", "vllm": "vllm", "gateway": "gateway"}[kind]) or "latest"
    return repo if ":" in repo.rsplit("/", 1)[-1] or "@" in repo else f"{repo}:{tag}"


def _http_probe(port: int, path: str) -> list[str]:
    # python3 exists in the gateway, vLLM and stand-in images; neither curl nor wget is guaranteed.
    return ["CMD", "python3", "-c",
            f"import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4).status == 200 else 1)"]


def engine_services(config: Config) -> list[EngineService]:
    router = Router(config)
    docker = config.docker
    services: list[EngineService] = []
    ollama_models = [r.name for r in router.routes.values()
                     if r.engine == "ollama" and r.base_urls == (OLLAMA_DEFAULT_URL,)]
    if ollama_models:
        services.append(EngineService(
            name="ollama", kind="ollama", image=_image(config, "ollama"), port=11434, models=ollama_models,
            volumes=[f"{docker['ollama-dir']}:/root/.ollama"],
            environment={"OLLAMA_HOST": "0.0.0.0:11434", "OLLAMA_KEEP_ALIVE": "30m"},
            healthcheck=["CMD", "ollama", "list"], host_port=11434))
    next_port = VLLM_PORT
    for route in router.routes.values():
        if route.engine != "vllm" or route.base_urls != (f"http://{vllm_service_name(route.name)}:{VLLM_PORT}",):
            continue
        spec = route.spec
        command = ["--model", spec.path or spec.name, "--served-model-name", spec.name,
                   "--host", "0.0.0.0", "--port", str(VLLM_PORT), *vllm_cli_args(spec.params), *vllm_lora_args(spec),
                   *spec.vllm_args]
        services.append(EngineService(
            name=vllm_service_name(spec.name), kind="vllm", image=_image(config, "vllm"), port=VLLM_PORT,
            command=command, models=[spec.name], volumes=[f"{docker['models-dir']}:/models:ro"],
            environment={"HF_HOME": "/models/.hf"}, healthcheck=_http_probe(VLLM_PORT, "/health"),
            host_port=next_port))
        next_port += 1
    return services


def render_compose(config: Config, platform: str | None = None, gpu: bool | None = None,
                   config_path: str = "./config.yaml") -> str:
    platform = platform or config.platform
    docker_gpu = config.docker.get("gpu", "auto")
    if gpu is None and docker_gpu != "auto":
        gpu = bool(docker_gpu)
    mode = gpu_mode(platform, gpu)
    engines = engine_services(config)
    emb = config.embedding
    local_embeddings = [r.spec for r in Router(config).routes.values() if r.engine == "local"]
    gateway_volumes = [f"{config_path}:{GATEWAY_CONFIG_PATH}:ro"]
    for spec in local_embeddings:
        if spec.path and spec.path.startswith("/"):
            gateway_volumes.append(f"{spec.path}:{spec.path}:ro")
    gateway_gpu = mode != "none" and bool(local_embeddings) and str(emb.get("device", "cpu")).startswith("cuda")
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template(TEMPLATE_NAME).render(
        docker=config.docker, gateway=config.gateway, engines=engines, gpu_mode=mode, platform=platform,
        gateway_image=_image(config, "gateway"), gateway_volumes=gateway_volumes, gateway_gpu=gateway_gpu,
        gateway_healthcheck=_http_probe(config.gateway["port"], "/health_check"),
        config_target=GATEWAY_CONFIG_PATH, config_digest=config_digest(config))


def config_digest(config: Config) -> str:
    """Changes whenever the config does, so compose recreates the gateway (a bind-mounted file is not re-read)."""
    return hashlib.sha256(json.dumps(config.raw, sort_keys=True).encode()).hexdigest()[:16]


def compose_context_models(config: Config) -> dict[str, list[str]]:
    """Which models each engine service must hold (the role pulls Ollama's)."""
    return {s.name: s.models for s in engine_services(config)}
