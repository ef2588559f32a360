"""Load a config.yaml, validate it against the schema plus the rules a schema cannot say, build typed settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .schema import ConfigIssue, schema_issues, with_defaults

CONFIG_ENV = "VILMS_CONFIG"
# Seed spellings still accepted: (section, old key) -> new key. The old value is applied under the new key.
LEGACY_KEYS = {("docker", "docker-registry"): "registry", ("docker", "docker-project"): "project-name"}


class ConfigError(Exception):
    """A config that must not be used; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(i.render() for i in issues))


def normalize_params(raw: Any) -> dict[str, Any]:
    """The seed wrote params as a list of one-key maps; a map is accepted too. Both become one map."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    merged: dict[str, Any] = {}
    for item in raw:
        merged.update(item)
    return merged


def as_url_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter on a base model: `name` is what clients ask for and what the engine serves it as."""

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    pointer: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One configured model, as written (before routing decides its engine)."""

    name: str
    type: str = "llm"
    engine: str | None = None
    aliases: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    base_urls: tuple[str, ...] = ()
    vllm_args: tuple[str, ...] = ()
    trust_remote_code: bool = False
    matryoshka: bool = False
    pointer: str = ""
    adapters: tuple[AdapterSpec, ...] = ()
    max_loras: int | None = None
    max_lora_rank: int | None = None
    parent: str | None = None  # set on an adapter's own spec: the base model it runs on

    @property
    def is_embedding(self) -> bool:
        return self.type == "embedding"


@dataclass(frozen=True)
class Config:
    """A validated config with schema defaults filled in. `raw` is that filled dict."""

    raw: dict[str, Any]
    models: tuple[ModelSpec, ...]
    source: str = "<memory>"
    notes: tuple[ConfigIssue, ...] = ()  # warnings found while loading (deprecated spellings)

    @property
    def platform(self) -> str:
        return self.raw["host"]["platform"]

    @property
    def serving(self) -> dict[str, Any]:
        return self.raw["serving"]

    @property
    def embedding(self) -> dict[str, Any]:
        return self.raw["embedding"]

    @property
    def gateway(self) -> dict[str, Any]:
        return self.raw["gateway"]

    @property
    def media(self) -> dict[str, Any]:
        return self.raw["media"]

    @property
    def docker(self) -> dict[str, Any]:
        return self.raw["docker"]

    @property
    def global_aliases(self) -> dict[str, str]:
        return dict(self.raw.get("model-aliases") or {})


def _model_specs(filled: dict[str, Any]) -> list[ModelSpec]:
    specs = []
    for index, m in enumerate(filled["serving"].get("models") or []):
        specs.append(
            ModelSpec(
                name=m["name"],
                type=m.get("type", "llm"),
                engine=m.get("engine"),
                aliases=tuple(m.get("aliases") or ()),
                params=normalize_params(m.get("params")),
                path=m.get("path"),
                base_urls=as_url_list(m.get("base-url")),
                vllm_args=tuple(m.get("vllm-args") or ()),
                trust_remote_code=bool(m.get("trust-remote-code", False)),
                matryoshka=bool(m.get("matryoshka", False)),
                pointer=f"/serving/models/{index}",
                adapters=tuple(AdapterSpec(a["name"], a["path"], tuple(a.get("aliases") or ()),
                                           f"/serving/models/{index}/adapters/{j}")
                               for j, a in enumerate(m.get("adapters") or ())),
                max_loras=m.get("max-loras"),
                max_lora_rank=m.get("max-lora-rank"),
            )
        )
    emb = filled["embedding"]
    names = {s.name for s in specs}
    if emb.get("enabled") and emb.get("model") and emb["model"] not in names:
        specs.append(
            ModelSpec(
                name=emb["model"],
                type="embedding",
                engine="openai" if emb.get("base-url") else "local",
                aliases=tuple(emb.get("aliases") or ()),
                path=emb.get("path"),
                base_urls=as_url_list(emb.get("base-url")),
                trust_remote_code=bool(emb.get("trust-remote-code")),
                matryoshka=bool(emb.get("matryoshka")),
                pointer="/embedding",
            )
        )
    return specs


def apply_legacy_keys(data: dict[str, Any], filled: dict[str, Any]) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """Move seed spellings to their new keys in `filled`: (errors, deprecation warnings).

    Both spellings with different values is an error: silently preferring one would deploy the other's surprise.
    """
    errors, warnings = [], []
    for (section, old), new in LEGACY_KEYS.items():
        given = data.get(section) or {}
        if old not in given:
            continue
        where = f"/{section}/{old}"
        if new in given and given[new] != given[old]:
            errors.append(ConfigIssue(where, f"{section}.{old} ({given[old]!r}) and {section}.{new} ({given[new]!r}) disagree",
                                      f"keep {section}.{new} only"))
            continue
        filled[section][new] = filled[section].pop(old)
        warnings.append(ConfigIssue(where, f"{section}.{old} is the seed's spelling of {section}.{new}; it is applied as such",
                                    f"rename it to {section}.{new}", severity="warning"))
    return errors, warnings


def build_config(data: Any, source: str = "<memory>") -> Config:
    """Validate `data` (schema, then cross-field rules) and return a Config, or raise ConfigError."""
    issues = schema_issues(data)
    if issues:
        raise ConfigError(issues)
    filled = with_defaults(data)
    legacy_errors, notes = apply_legacy_keys(data, filled)
    if legacy_errors:
        raise ConfigError(legacy_errors)
    config = Config(raw=filled, models=tuple(_model_specs(filled)), source=source, notes=tuple(notes))
    from .routing import semantic_issues  # routing owns alias and engine rules

    errors = [i for i in semantic_issues(config) if i.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return config


def accepted_config(data: dict[str, Any], source: str = "<render>") -> Config:
    """A Config from data `build_config` already accepted and `vilms render` wrote out (seed spellings renamed).

    Defaults are filled, nothing is re-checked: a render's second step (the Jetson engine tag, known only once
    the host's L4T release is read) must not validate the config a second time.
    """
    filled = with_defaults(data)
    return Config(raw=filled, models=tuple(_model_specs(filled)), source=source)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([ConfigIssue("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]) from exc


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError([ConfigIssue("", f"no config given: pass --config or set {CONFIG_ENV}")])
    return build_config(read_yaml(path), source=str(path))
