"""Render docker-compose.yaml from a config: the one template, used by `vilms render`, `vilms compose` and the role.

Python decides *what* runs (which engines, names, images, commands, GPU mode, limits); the template only lays it
out. Which engine services exist is routing's answer (`routing.stack_services`): the same URLs the gateway
connects to, so compose can never create a service the gateway does not reach, or miss one it does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template

from vilms.deploy import weights
from vilms.config.model import Config
from vilms.config.cuda import vllm_default_tag
from vilms.config.params import vllm_cli_args
from vilms.config.adapters import vllm_lora_args
from vilms.config.routing import GATEWAY_SERVICE, EngineService, Router, stack_services

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "docker-compose.yaml.j2"
GATEWAY_CONFIG_PATH = "/etc/vilms/config.yaml"
GATEWAY_KEYS_PATH = "/etc/vilms/keys.yaml"
HOST_PORT_BASE = {"ollama": 11434, "vllm": 8000}  # first host port per engine kind when engine ports are published


@dataclass
class ComposeService:
    """One engine container as compose runs it (routing's EngineService plus image, command, mounts)."""

    name: str
    kind: str
    image: str
    port: int
    models: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)
    host_port: int | None = None


@dataclass
class GatewayService:
    """The gateway container: image, mounts and whether it needs the GPU (local CUDA embeddings)."""

    image: str
    port: int
    models: list[str]
    volumes: list[str]
    gpu: bool
    models_dir: str = ""  # where shipped embedding weights are mounted (VILMS_MODELS_DIR), "" = none


def gpu_mode(platform: str, gpu: bool | None) -> str:
    """'runtime' (Jetson: CSV mode, --gpus does not work), 'devices' (dgpu reservations) or 'none'."""
    if gpu is None:
        gpu = platform == "js" or shutil.which("nvidia-smi") is not None or os.path.exists("/etc/nv_tegra_release")
    if not gpu:
        return "none"
    return "runtime" if platform == "js" else "devices"


def resolve_gpu_mode(config: Config, platform: str | None = None, gpu: bool | None = None) -> str:
    """The GPU mode for this render: the caller's choice, else `docker.gpu`, else detection."""
    docker_gpu = config.docker.get("gpu", "auto")
    if gpu is None and docker_gpu != "auto":
        gpu = bool(docker_gpu)
    return gpu_mode(platform or config.platform, gpu)


def names_registry(repo: str) -> bool:
    """Docker's rule: a first path component with a dot or a colon, or `localhost`, is a registry host."""
    first, _, rest = repo.partition("/")
    return bool(rest) and ("." in first or ":" in first or first == "localhost")


def image_ref(config: Config, kind: str) -> str:
    """`repo:tag` for an engine kind or the gateway, with `docker.registry` in front of registry-less repos."""
    docker = config.docker
    repo = docker["image"][kind]
    registry = (docker.get("registry") or "").rstrip("/")
    if registry and not names_registry(repo):
        repo = f"{registry}/{repo}"
    if ":" in repo.rsplit("/", 1)[-1] or "@" in repo:
        return repo
    tag = docker["tag"].get({"ollama": "engine", "vllm": "vllm", "gateway": "gateway"}[kind])
    if not tag:  # vLLM: the build for the host's CUDA line (host.cuda-version), else latest
        tag = vllm_default_tag(config) if kind == "vllm" else "latest"
    if kind == "gateway" and gateway_variant(config) == "embeddings" and not tag.endswith("-emb"):
        tag += "-emb"  # the image with sentence-transformers (gateway/Dockerfile, VARIANT=embeddings)
    return f"{repo}:{tag}"


def gateway_variant(config: Config) -> str:
    """'embeddings' when the gateway itself must run a model (local embedding/reranker), else 'slim'."""
    chosen = config.docker.get("gateway-variant", "auto")
    if chosen != "auto":
        return chosen
    return "embeddings" if any(r.engine == "local" for r in Router(config).routes.values()) else "slim"


def _http_probe(port: int, path: str) -> list[str]:
    # python3 exists in the gateway, vLLM and stand-in images; neither curl nor wget is guaranteed.
    return ["CMD", "python3", "-c",
            f"import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4).status == 200 else 1)"]


def _compose_service(config: Config, svc: EngineService, host_port: int) -> ComposeService:
    docker = config.docker
    if svc.kind == "ollama":
        return ComposeService(
            name=svc.name, kind="ollama", image=image_ref(config, "ollama"), port=svc.port, models=list(svc.models),
            volumes=[f"{docker['ollama-dir']}:/root/.ollama"],
            environment={"OLLAMA_HOST": f"0.0.0.0:{svc.port}", "OLLAMA_KEEP_ALIVE": "30m"},
            healthcheck=["CMD", "ollama", "list"], host_port=host_port)
    spec = svc.spec
    assert spec is not None, "a vLLM service always carries its model"
    volumes, environment, model = [f"{docker['models-dir']}:/models:ro"], {"HF_HOME": "/models/.hf"}, spec.path
    if (shipped := weights.by_model(config).get(spec.name)) is not None:  # the role ships them: no hub at run time
        volumes, environment, model = ([f"{shipped.host_dir}:{shipped.container_path}:ro"], {"HF_HUB_OFFLINE": "1"},
                                       shipped.container_path)
    command = ["--model", model or spec.name, "--served-model-name", spec.name,
               "--host", "0.0.0.0", "--port", str(svc.port), *vllm_cli_args(spec.params), *vllm_lora_args(spec),
               *spec.vllm_args]
    return ComposeService(
        name=svc.name, kind="vllm", image=image_ref(config, "vllm"), port=svc.port, models=[spec.name],
        command=command, volumes=volumes, environment=environment,
        healthcheck=_http_probe(svc.port, "/health"), host_port=host_port)


def proxy_environment(config: Config, direct: list[str]) -> dict[str, str]:
    """HTTP(S)_PROXY/NO_PROXY (both spellings: tools read one or the other) from docker.proxy, or nothing.

    `direct` (the stack's own service names) and loopback always bypass the proxy: an engine never reaches its
    neighbours through the customer's proxy.
    """
    proxy = config.docker.get("proxy") or {}
    if not (proxy.get("http") or proxy.get("https")):
        return {}
    env: dict[str, str] = {}
    for key in ("http", "https"):
        if proxy.get(key):
            env[f"{key.upper()}_PROXY"] = env[f"{key}_proxy"] = proxy[key]
    bypass = ",".join(dict.fromkeys([*(proxy.get("no-proxy") or []), "localhost", "127.0.0.1", "::1", *direct]))
    env["NO_PROXY"] = env["no_proxy"] = bypass
    return env


def engine_services(config: Config) -> list[ComposeService]:
    """Routing's engine services, made concrete for compose (host ports counted per kind, in config order)."""
    next_port = dict(HOST_PORT_BASE)
    services = []
    for svc in stack_services(config):
        services.append(_compose_service(config, svc, next_port[svc.kind]))
        next_port[svc.kind] += 1
    proxy = proxy_environment(config, [s.name for s in services] + [GATEWAY_SERVICE])
    for service in services:
        service.environment.update(proxy)
    return services


def gateway_service(config: Config, mode: str, config_path: str = "./config.yaml",
                    keys_path: str | None = None) -> GatewayService:
    local = [r.spec for r in Router(config).routes.values() if r.engine == "local"]
    volumes = [f"{config_path}:{GATEWAY_CONFIG_PATH}:ro"]
    if keys_path:
        volumes.append(f"{keys_path}:{GATEWAY_KEYS_PATH}:ro")
    shipped = weights.by_model(config)
    for spec in local:
        if (w := shipped.get(spec.name)) is not None:
            volumes.append(f"{w.host_dir}:{w.container_path}:ro")
        elif spec.path and spec.path.startswith("/"):
            volumes.append(f"{spec.path}:{spec.path}:ro")
    gpu = mode != "none" and bool(local) and str(config.embedding.get("device", "cpu")).startswith("cuda")
    return GatewayService(image=image_ref(config, "gateway"), port=config.gateway["port"],
                          models=[s.name for s in local], volumes=volumes, gpu=gpu,
                          models_dir=weights.CONTAINER_ROOT if any(s.name in shipped for s in local) else "")


@functools.lru_cache(maxsize=1)
def compose_template() -> Template:
    """The compose template, compiled once per process (`vilms render --many`: 500 hosts compiled it 500 times,
    two thirds of the render's time)."""
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template(TEMPLATE_NAME)


def render_compose(config: Config, platform: str | None = None, gpu: bool | None = None,
                   config_path: str = "./config.yaml", keys_path: str | None = None,
                   digest: str | None = None) -> str:
    """The compose file text. `digest` (of the files the gateway mounts) forces a gateway re-create on change."""
    platform = platform or config.platform
    mode = resolve_gpu_mode(config, platform, gpu)
    gateway = gateway_service(config, mode, config_path, keys_path)
    return compose_template().render(
        docker=config.docker, gateway=config.gateway, engines=engine_services(config), gpu_mode=mode,
        platform=platform, gateway_name=GATEWAY_SERVICE, gateway_image=gateway.image,
        gateway_volumes=gateway.volumes, gateway_gpu=gateway.gpu, gateway_models_dir=gateway.models_dir,
        gateway_healthcheck=_http_probe(config.gateway["port"], "/health_check"),
        config_target=GATEWAY_CONFIG_PATH, config_digest=digest or config_digest(config))


def config_digest(config: Config) -> str:
    """Changes whenever the config does, so compose recreates the gateway (a bind-mounted file is not re-read)."""
    return hashlib.sha256(json.dumps(config.raw, sort_keys=True).encode()).hexdigest()[:16]


def compose_context_models(config: Config) -> dict[str, list[str]]:
    """Which models each engine service must hold (the role pulls Ollama's)."""
    return {s.name: list(s.models) for s in stack_services(config)}
