"""`vilms render`: validate a host's config once and write everything the role acts on (contract C1).

Output, all in one directory, written only after every check passed (bad input changes nothing there):
  config.yaml          the config the gateway reads: as written, seed spellings renamed, inline API keys moved out
  docker-compose.yaml  from the one template
  plan.json            services, images, Ollama pulls, gate models, gateway address, GPU mode, project
  keys.yaml            only when API keys are configured (mode 0600)
The same input gives byte-identical files, and an unchanged file is not rewritten, so reruns change nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .adapters import ollama_adapters
from .compose import (GATEWAY_KEYS_PATH, engine_services, gateway_service, render_compose, resolve_gpu_mode)
from .config import LEGACY_KEYS, Config, ConfigError, build_config, read_yaml
from .routing import GATEWAY_SERVICE, Router, chat_engine, semantic_issues
from .schema import ConfigIssue

PLAN_VERSION = 1
FILES = ("config.yaml", "docker-compose.yaml", "plan.json", "keys.yaml")


@dataclass(frozen=True)
class Render:
    """The files of one render, as text, plus the config they came from and its warnings."""

    config: Config
    files: dict[str, str]
    plan: dict[str, Any]
    warnings: list[ConfigIssue]


def with_engine_tag(data: Any, engine_tag: str | None) -> Any:
    """Fill docker.tag.engine (the Jetson tag the role detected) when the config leaves it unset."""
    if not engine_tag or not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    docker = data.setdefault("docker", {})
    if isinstance(docker, dict):
        tag = docker.setdefault("tag", {})
        if isinstance(tag, dict) and not tag.get("engine"):
            tag["engine"] = engine_tag
    return data


def as_written(data: dict[str, Any]) -> dict[str, Any]:
    """The config the gateway gets: as the operator wrote it, seed spellings renamed, defaults NOT filled.

    The gateway fills schema defaults itself; writing them out would make a gateway image one release older
    than this renderer reject keys it has never heard of (a pinned `docker.tag.gateway` is normal).
    """
    out = copy.deepcopy(data)
    for (section, old), new in LEGACY_KEYS.items():
        if isinstance(out.get(section), dict) and old in out[section]:
            out[section][new] = out[section].pop(old)
    return out


def _key_entries(config: Config, base_dir: Path) -> tuple[list[dict[str, Any]], list[ConfigIssue]]:
    """Inline gateway.api-keys plus the entries of gateway.api-keys-file (read here, on the render machine)."""
    gw = config.gateway
    entries = list(gw.get("api-keys") or [])
    path = gw.get("api-keys-file")
    if not path:
        return entries, []
    file = (base_dir / path) if not os.path.isabs(path) else Path(path)
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as exc:
        return entries, [ConfigIssue("/gateway/api-keys-file", f"cannot read {path}: {exc}",
                                     "give a readable YAML file holding a list of {name, key, ...}")]
    merged = entries + (loaded if isinstance(loaded, list) else [loaded])
    try:  # the one schema checks the file's entries too
        build_config({"serving": {"models": []}, "gateway": {"api-keys": merged}})
    except ConfigError as exc:
        return entries, [ConfigIssue("/gateway/api-keys-file", f"{path}: {i.pointer}: {i.message}", i.hint)
                         for i in exc.issues]
    return merged, []


def _key_issues(entries: list[dict[str, Any]], inline: int) -> list[ConfigIssue]:
    """Names and key values must be unique across both sources (`inline` = how many came from the config)."""
    issues, seen_names, seen_keys = [], set(), set()
    for index, entry in enumerate(entries):
        where = f"/gateway/api-keys/{index}" if index < inline else "/gateway/api-keys-file"
        label = "" if index < inline else f" (entry {index - inline} of the file)"
        if entry["name"] in seen_names:
            issues.append(ConfigIssue(where, f"API key name {entry['name']!r} is used twice{label}",
                                      "names identify keys in logs and limits: keep them unique"))
        if entry["key"] in seen_keys:
            issues.append(ConfigIssue(where, f"the same key value appears twice{label}"))
        seen_names.add(entry["name"])
        seen_keys.add(entry["key"])
    return issues


def _deploy_issues(config: Config) -> list[ConfigIssue]:
    """Deploy-time rules (not checked at gateway start, so `vilms serve` on a dev box still works)."""
    try:
        from .security import exposure_issues  # type: ignore[attr-defined]  # provided by the API-keys work (C2)
    except ImportError:
        return []
    # Compose publishes the gateway on docker.gateway-bind; inside the container it listens on every interface.
    return [i for i in exposure_issues(config, bind=config.docker["gateway-bind"]) if i.severity == "error"]


def _gateway_url(bind: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _weights(config: Config) -> list[dict[str, Any]]:
    try:
        from .weights import weights_for  # type: ignore[attr-defined]  # contract C3
    except ImportError:
        return []
    return [w.as_dict() for w in weights_for(config)]


def _ollama_adapters(config: Config, engines: list[Any]) -> list[dict[str, str]]:
    """One derived Ollama model per LoRA adapter on an Ollama base, with the service that holds the base."""
    service_of = {model: s.name for s in engines if s.kind == "ollama" for model in s.models}
    return [{**entry, "service": service_of[entry["from"]]}
            for entry in ollama_adapters(config, lambda spec: chat_engine(config, spec)) if entry["from"] in service_of]


def build_plan(config: Config, mode: str, platform: str, digest: str, files: list[str]) -> dict[str, Any]:
    """plan.json (version 1): every fact the role acts on, so it re-derives nothing."""
    docker, router = config.docker, Router(config)
    engines = engine_services(config)
    gateway = gateway_service(config, mode)
    services = [{"name": s.name, "kind": s.kind, "image": s.image, "port": s.port, "models": s.models,
                 "host_port": s.host_port if docker["publish-engine-ports"] else None} for s in engines]
    services.append({"name": GATEWAY_SERVICE, "kind": "gateway", "image": gateway.image, "port": gateway.port,
                     "models": gateway.models, "host_port": docker["gateway-port"]})
    chat = [r.name for r in router.routes.values() if r.spec.type in ("llm", "vlm")]
    embedding = [r.name for r in router.routes.values() if r.spec.is_embedding]
    return {
        "version": PLAN_VERSION,
        "project": docker["project-name"],
        "platform": platform,
        "gpu_mode": mode,
        "config_digest": digest,
        "gateway": {"service": GATEWAY_SERVICE, "bind": docker["gateway-bind"], "port": docker["gateway-port"],
                    "url": _gateway_url(docker["gateway-bind"], docker["gateway-port"])},
        "services": services,
        "images": list(dict.fromkeys(s["image"] for s in services)),
        "ollama_pulls": [{"service": s.name, "models": s.models} for s in engines if s.kind == "ollama"],
        "ollama_adapters": _ollama_adapters(config, engines),
        "gate": {"chat": chat, "embedding": embedding, "models": router.names()},
        "weights": _weights(config),
        "files": files,
    }


def render(data: Any, *, gpu: bool | None = None, engine_tag: str | None = None, base_dir: Path = Path(".")) -> Render:
    """Validate once and produce every file as text; raises ConfigError with every issue found."""
    config = build_config(with_engine_tag(data, engine_tag))
    keys, issues = _key_entries(config, base_dir)
    issues += _key_issues(keys, len(config.gateway.get("api-keys") or [])) + _deploy_issues(config)
    if issues:
        raise ConfigError(issues)
    warnings = list(config.notes) + [i for i in semantic_issues(config) if i.severity == "warning"]
    effective = as_written(with_engine_tag(data, engine_tag))
    files: dict[str, str] = {}
    if keys:
        gateway = effective.setdefault("gateway", {})
        gateway.pop("api-keys", None)
        gateway["api-keys-file"] = GATEWAY_KEYS_PATH
        files["keys.yaml"] = yaml.safe_dump(keys, sort_keys=False, allow_unicode=True)
    files["config.yaml"] = ("# Generated by `vilms render`. Do not edit: change the source config and re-render.\n"
                            + yaml.safe_dump(effective, sort_keys=False, allow_unicode=True))
    digest = hashlib.sha256("\0".join(files[n] for n in sorted(files)).encode()).hexdigest()[:16]
    platform = config.platform
    mode = resolve_gpu_mode(config, platform, gpu)
    files["docker-compose.yaml"] = render_compose(config, platform=platform, gpu=gpu, config_path="./config.yaml",
                                                  keys_path="./keys.yaml" if keys else None, digest=digest)
    names = ["config.yaml", "docker-compose.yaml"] + (["keys.yaml"] if keys else [])
    plan = build_plan(config, mode, platform, digest, names)
    files["plan.json"] = json.dumps(plan, indent=2) + "\n"
    return Render(config, files, plan, warnings)


def write_render(result: Render, out: Path) -> list[str]:
    """Write the files that differ (atomically; keys.yaml 0600) and drop a stale keys.yaml. Returns changed names."""
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in FILES:
        target = out / name
        text = result.files.get(name)
        if text is None:
            if target.exists():
                target.unlink()
                changed.append(name)
            continue
        if target.is_file() and target.read_bytes() == text.encode():
            continue
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o600 if name == "keys.yaml" else 0o644)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        changed.append(name)
    return changed


def render_to(config_path: str, out: str, *, gpu: bool | None = None, engine_tag: str | None = None) -> tuple[Render, list[str]]:
    """Read, validate, render and write: the whole of `vilms render`."""
    result = render(read_yaml(config_path), gpu=gpu, engine_tag=engine_tag, base_dir=Path(config_path).parent)
    return result, write_render(result, Path(out))
