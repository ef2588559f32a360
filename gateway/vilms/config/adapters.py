"""LoRA adapters: one base model, several specialisations, each asked for by its own name.

An adapter is served by its base model's engine under the adapter's name: vLLM loads it on the base's
service (`--enable-lora --lora-modules name=path`), Ollama gets a derived model (`FROM base` + `ADAPTER path`,
created by the role's ollama-adapters.yml). So a request for the adapter name goes to the base's URLs with the
adapter's name as the engine-side model, and nothing else in the request path changes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from vilms.config.model import AdapterSpec, Config, ModelSpec
from vilms.config.schema import ConfigIssue

CARRIERS = ("vllm", "ollama")


def adapter_spec(base: ModelSpec, adapter: AdapterSpec) -> ModelSpec:
    """The adapter as a model of its own: the base's type, engine, params and URLs; its own name and aliases."""
    return dataclasses.replace(base, name=adapter.name, aliases=adapter.aliases, path=adapter.path, adapters=(),
                               max_loras=None, max_lora_rank=None, pointer=adapter.pointer, parent=base.name)


def all_adapters(config: Config) -> list[tuple[ModelSpec, AdapterSpec]]:
    return [(spec, adapter) for spec in config.models for adapter in spec.adapters]


def vllm_lora_args(spec: ModelSpec) -> list[str]:
    """`vllm serve` flags for a base model's adapters (none when it has none)."""
    if not spec.adapters:
        return []
    args = ["--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in spec.adapters),
            "--max-loras", str(spec.max_loras or len(spec.adapters))]
    if spec.max_lora_rank:
        args += ["--max-lora-rank", str(spec.max_lora_rank)]
    return args


def ollama_adapters(config: Config, engine_of: Callable[[ModelSpec], str]) -> list[dict[str, str]]:
    """What the role creates on Ollama: one derived model per adapter, `{"name", "from", "adapter"}`."""
    return [{"name": a.name, "from": spec.name, "adapter": a.path}
            for spec, a in all_adapters(config) if engine_of(spec) == "ollama"]


def adapter_issues(config: Config, engine_of: Callable[[ModelSpec], str]) -> list[ConfigIssue]:
    """Adapters only where the engine and the base model can carry them."""
    issues = []
    for spec in config.models:
        if not spec.adapters:
            continue
        where = f"{spec.pointer}/adapters"
        if spec.type in ("embedding", "reranker"):
            issues.append(ConfigIssue(where, f"{spec.type} model {spec.name!r} cannot carry LoRA adapters",
                                      "put adapters on an llm or vlm model"))
            continue
        engine = engine_of(spec)
        if engine not in CARRIERS:
            issues.append(ConfigIssue(where, f"model {spec.name!r} runs on the {engine} engine, which vilms cannot "
                                             "load LoRA adapters on", "serve the base model with vllm or ollama"))
        if engine == "vllm" and spec.max_loras and spec.max_loras > len(spec.adapters):
            issues.append(ConfigIssue(f"{spec.pointer}/max-loras", f"max-loras {spec.max_loras} is more than the "
                                      f"{len(spec.adapters)} adapter(s) configured", severity="warning"))
    return issues
