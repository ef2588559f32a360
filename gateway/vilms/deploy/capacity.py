"""Memory estimates per model: what each configured model will take on the host that runs it.

Why: a model that does not fit surfaces minutes into a rollout as an engine crash, after the download.
The estimate is what the config knows: a declared `memory-gb` wins; else weights (an Ollama library size,
or parameters x bits of the quantisation) + KV cache (layers x KV heads x head dim x 2 x bytes x context x
parallel sequences) + the engine's overhead. vLLM is different: it takes `gpu-memory-utilization` of the card
up front, so its charge is that reservation, and its own need must fit inside it. Budgets and verdicts are in
`capacity_plan.py`. Figures and their sources are in `capacity_data.py`. All sizes are GiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from vilms.deploy import capacity_data as data
from vilms.config.model import Config, ModelSpec
from vilms.config.routing import Router

GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    """One model's memory need (GiB); `gib is None` = unknown (the plan warns, never passes silently)."""

    gib: float | None
    weights: float = 0.0
    kv: float = 0.0
    overhead: float = 0.0
    context: int = 0
    kv_per_token: float = 0.0   # bytes; lets a fix say which context would fit
    basis: str = ""

    def parts(self) -> str:
        if self.gib is None:
            return self.basis
        kv = f" + KV {self.kv:.2f} ({self.context} tokens)" if self.kv else ""
        return f"weights {self.weights:.2f}{kv} + overhead {self.overhead:.2f} GiB ({self.basis})"


@dataclass(frozen=True)
class Demand:
    """What one model asks of the host: an estimate, and for vLLM the reservation it makes."""

    model: str
    engine: str                  # ollama | vllm | local
    estimate: Estimate
    pointer: str = ""
    utilization: float = 0.0     # vLLM: gpu-memory-utilization (fraction of each of its GPUs)
    tensor_parallel: int = 1     # vLLM: GPUs it spans
    device: str = "gpu"          # gpu (GPU or unified memory) | cpu (host RAM)


def _bits(quant: str | None, default: float) -> float:
    return data.QUANT_BITS.get((quant or "").lower(), default)


def _weights_gib(arch: data.Arch, bits: float, vision_bits: float) -> float:
    """Parameters x bits; a VLM's vision tower at its own precision (Ollama keeps it at f16)."""
    text_b = arch.params_b - arch.vision_b
    return (text_b * bits + arch.vision_b * vision_bits) / 8 * 1e9 / GIB


def weights_from_params(arch_key: str, quant: str) -> float:
    """Weights (GiB) of a table architecture at a quantisation, from its parameter count alone."""
    arch = data.ARCHS[arch_key]
    bits = _bits(quant, 16.0)
    return _weights_gib(arch, bits, 16.0 if bits < 16 else bits)


# --- model name -> table entry ---------------------------------------------------------------------------

_SIZE = re.compile(r"^\d+(\.\d+)?[bm]$")


def ollama_entry(name: str) -> tuple[str, data.OllamaTag | None, str | None]:
    """(library tag, its table entry, a non-default quantisation named in the tag) for an Ollama model name."""
    base, _, tag = name.lower().partition(":")
    tag = tag or "latest"
    if tag == "latest" and base in data.OLLAMA_LATEST:
        return data.OLLAMA_LATEST[base], data.OLLAMA_TAGS[data.OLLAMA_LATEST[base]], None
    key = f"{base}:{tag}"
    if key in data.OLLAMA_TAGS:
        return key, data.OLLAMA_TAGS[key], None
    parts = tag.split("-")
    quant = next((p for p in parts if p in data.QUANT_BITS), None)
    size = parts[0] if _SIZE.match(parts[0]) else None
    key = f"{base}:{size}" if size else f"{base}:latest"
    if key not in data.OLLAMA_TAGS and base in data.OLLAMA_LATEST and not size:
        key = data.OLLAMA_LATEST[base]
    return key, data.OLLAMA_TAGS.get(key), (quant if quant not in (None, "q4_k_m") else None)


_HF_QUANT = re.compile(r"-(awq|gptq(?:-int[48])?|fp8(?:-dynamic)?|int[48]|bnb-4bit)$")


def hf_entry(spec: ModelSpec) -> tuple[str | None, str | None]:
    """(architecture key, quantisation named in the repo id) for a vLLM model's name or path."""
    quant = None
    for candidate in (spec.name, spec.path or ""):
        leaf = candidate.rstrip("/").rsplit("/", 1)[-1].lower()
        match = _HF_QUANT.search(leaf)
        if match:
            quant = match.group(1).split("-")[0]
            leaf = leaf[: match.start()]
        if leaf in data.HF_IDS:
            return data.HF_IDS[leaf], quant
    return None, quant


def embedder_entry(spec: ModelSpec) -> tuple[float, str] | None:
    for candidate in (spec.name, spec.path or ""):
        leaf = candidate.rstrip("/").rsplit("/", 1)[-1].lower()
        if leaf in data.EMBEDDERS:
            return data.EMBEDDERS[leaf]
    return None


# --- estimates per engine --------------------------------------------------------------------------------

def declared(config: Config, spec: ModelSpec) -> float | None:
    """`memory-gb` of the model's own entry (or of the embedding block), GiB."""
    node: Any = config.raw
    for part in spec.pointer.strip("/").split("/"):
        node = node[int(part)] if isinstance(node, list) else node.get(part, {})
    value = node.get("memory-gb") if isinstance(node, Mapping) else None
    return float(value) if value is not None else None


def ollama_context(spec: ModelSpec, arch: data.Arch | None, device_gib: float) -> int:
    """num-ctx if set, else Ollama's default for this much memory, never past what the model was trained on."""
    if "num-ctx" in spec.params:
        return int(spec.params["num-ctx"])
    default = next(ctx for below, ctx in data.OLLAMA_CTX_TIERS if device_gib < below)
    return min(default, arch.max_ctx) if arch else default


def ollama_estimate(config: Config, spec: ModelSpec, device_gib: float) -> Estimate:
    tag, entry, quant = ollama_entry(spec.name)
    arch = data.ARCHS.get(entry.arch) if entry and entry.arch else None
    if entry is None:
        return _declared_or(config, spec, Estimate(None, basis=f"{spec.name!r} is not in the Ollama table"))
    if quant and arch:
        weights, basis = weights_from_params(entry.arch, quant), f"{arch.params_b} B params at {quant}"
    elif quant:
        return _declared_or(config, spec, Estimate(None, basis=f"{spec.name!r}: {quant} of a tag with no architecture"))
    else:
        weights, basis = entry.size_gb * data.GB, f"{tag} {entry.size_gb} GB, {entry.source}"
    ctx = ollama_context(spec, arch, device_gib) if arch else 0
    per_token = arch.kv_bytes_per_token(2) if arch else 0.0   # Ollama's KV cache is f16
    kv = per_token * ctx * data.OLLAMA_NUM_PARALLEL / GIB
    return _declared_or(config, spec, Estimate(weights + kv + data.OLLAMA_OVERHEAD_GIB, weights, kv,
                                               data.OLLAMA_OVERHEAD_GIB, ctx, per_token, basis))


def vllm_estimate(config: Config, spec: ModelSpec) -> Estimate:
    """What vLLM needs inside its reservation: weights + overhead + KV for one max-model-len sequence
    (vLLM refuses to start when even one does not fit)."""
    key, named_quant = hf_entry(spec)
    if key is None:
        return _declared_or(config, spec, Estimate(None, basis=f"{spec.name!r} is not in the architecture table"))
    arch = data.ARCHS[key]
    params = spec.params
    dtype = str(params.get("dtype", "auto"))
    dense_bits = 32.0 if dtype in ("float", "float32") else 16.0
    quant = params.get("quantization") or named_quant
    bits = _bits(quant, dense_bits) if quant else dense_bits
    weights = _weights_gib(arch, bits, dense_bits)
    kv_bytes = 1 if str(params.get("kv-cache-dtype", "auto")).startswith("fp8") else dense_bits / 8
    ctx = int(params.get("max-model-len", arch.max_ctx))
    tp = int(params.get("tensor-parallel-size", 1))
    per_token = arch.kv_bytes_per_token(kv_bytes)
    kv = per_token * ctx / GIB
    overhead = data.VLLM_OVERHEAD_GIB * tp
    basis = f"{arch.params_b} B params at {quant or f'{int(dense_bits)}-bit'}, {arch.source}"
    return _declared_or(config, spec, Estimate(weights + kv + overhead, weights, kv, overhead, ctx, per_token, basis))


def local_estimate(config: Config, spec: ModelSpec) -> Estimate:
    """A model the gateway runs itself (sentence-transformers loads fp32)."""
    entry = embedder_entry(spec)
    if entry is None:
        return _declared_or(config, spec, Estimate(None, basis=f"{spec.name!r} is not in the embedding table"))
    params_b, source = entry
    weights = params_b * 4e9 / GIB
    return _declared_or(config, spec, Estimate(weights, weights, basis=f"{params_b * 1000:.0f} M params fp32, {source}"))


def _declared_or(config: Config, spec: ModelSpec, computed: Estimate) -> Estimate:
    value = declared(config, spec)
    if value is None:
        return computed
    return Estimate(value, value, context=computed.context, kv_per_token=computed.kv_per_token,
                    basis=f"declared memory-gb at {spec.pointer}")


# --- which models run on this host ------------------------------------------------------------------------

def is_on_host(urls: tuple[str, ...]) -> bool:
    """An engine on this host: a compose service or container name (one DNS label) or loopback.

    A dotted name or a non-loopback address is another machine, whose memory is not this host's budget.
    """
    if not urls:
        return True
    host = re.sub(r"^[a-z]+://", "", urls[0].lower()).split("/")[0].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1", "host.docker.internal") or host.startswith("127.") or "." not in host


def demands(config: Config, device_gib: float) -> tuple[list[Demand], list[str]]:
    """Every model this host runs, with its estimate; and the models served elsewhere (not counted)."""
    out: list[Demand] = []
    remote: list[str] = []
    gateway_device = "gpu" if str(config.embedding.get("device", "cpu")).startswith("cuda") else "cpu"
    for route in Router(config).routes.values():
        spec = route.spec
        if route.engine == "local":
            out.append(Demand(spec.name, "local", local_estimate(config, spec), spec.pointer, device=gateway_device))
        elif route.engine in ("ollama", "vllm") and is_on_host(route.base_urls):
            if route.engine == "ollama":
                out.append(Demand(spec.name, "ollama", ollama_estimate(config, spec, device_gib), spec.pointer))
            else:
                util = float(spec.params.get("gpu-memory-utilization", data.VLLM_GPU_MEMORY_UTILIZATION))
                out.append(Demand(spec.name, "vllm", vllm_estimate(config, spec), spec.pointer, utilization=util,
                                  tensor_parallel=int(spec.params.get("tensor-parallel-size", 1))))
        else:
            remote.append(spec.name)
    if any(d.engine == "local" for d in out):
        runtime = Estimate(data.GATEWAY_TORCH_GIB, overhead=data.GATEWAY_TORCH_GIB, basis="torch runtime")
        out.append(Demand("(gateway torch runtime)", "local", runtime, "/embedding", device=gateway_device))
    return out, remote


def max_context_for(estimate: Estimate, room_gib: float) -> int:
    """The longest context whose KV cache fits in `room_gib` beside the weights and overhead (0: none)."""
    if not estimate.kv_per_token:
        return 0
    free = room_gib - estimate.weights - estimate.overhead
    return max(0, math.floor(free * GIB / estimate.kv_per_token / 256) * 256)
