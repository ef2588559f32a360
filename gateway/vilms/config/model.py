"""The typed settings a validated config becomes (Config, ModelSpec); loading and validation live in `load`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from vilms.config.schema import ConfigIssue

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
