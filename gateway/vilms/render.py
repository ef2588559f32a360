"""PROVISIONAL (h9r): a stand-in for h9's `vilms render` (contract C1) so the role can be built against plan.json.

Dropped when branch h9 lands its render.
"""

from __future__ import annotations

import copy
import json
import os

import yaml

from .compose import config_digest, engine_services, render_compose
from .config import ConfigError, build_config, read_yaml
from .routing import Router


def render(config_path: str, out: str, gpu: bool | None, engine_tag: str | None) -> dict:
    raw = read_yaml(config_path) or {}
    if engine_tag and not ((raw.get("docker") or {}).get("tag") or {}).get("engine"):
        raw = copy.deepcopy(raw)
        raw.setdefault("docker", {}).setdefault("tag", {})["engine"] = engine_tag
    config = build_config(raw, source=config_path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    compose = render_compose(config, gpu=gpu)
    with open(os.path.join(out, "docker-compose.yaml"), "w", encoding="utf-8") as fh:
        fh.write(compose)
    engines = engine_services(config)
    router = Router(config)
    gateway_image = yaml.safe_load(compose)["services"]["gateway"]["image"]
    docker = config.docker
    bind = docker["gateway-bind"]
    plan = {
        "version": 1, "project": docker["project-name"], "platform": config.platform, "gpu_mode": "none",
        "config_digest": config_digest(config),
        "gateway": {"service": "gateway", "bind": bind, "port": docker["gateway-port"],
                    "url": f"http://{'127.0.0.1' if bind == '0.0.0.0' else bind}:{docker['gateway-port']}"},
        "services": [{"name": s.name, "kind": s.kind, "image": s.image, "port": s.port, "models": s.models}
                     for s in engines] + [{"name": "gateway", "kind": "gateway", "image": gateway_image,
                                           "port": config.gateway["port"], "models": []}],
        "ollama_pulls": [{"service": s.name, "models": s.models} for s in engines if s.kind == "ollama"],
        "gate": {"chat": [r.name for r in router.routes.values() if not r.spec.is_embedding],
                 "embedding": [r.name for r in router.routes.values() if r.spec.is_embedding],
                 "models": router.names()},
        "weights": [], "files": ["config.yaml", "docker-compose.yaml"]}
    plan["images"] = sorted({s["image"] for s in plan["services"]})
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as fh:
        json.dump(plan, fh, indent=2)
    return plan


def cmd_render(args) -> int:
    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    try:
        render(args.config, args.out, gpu, args.engine_tag)
    except ConfigError as exc:
        if args.format == "json":
            print(json.dumps({"errors": [i.as_dict() for i in exc.issues]}))
        else:
            print(exc)
        return 1
    return 0
