"""The figures the capacity plan rests on, each with where it comes from.

Kept apart from the arithmetic (`capacity.py`) so a new model or board is one line here.
Sizes are GiB (2**30 bytes) unless a name says GB: Ollama's library lists decimal GB, nvidia-smi MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9 / 2**30  # one decimal GB in GiB


@dataclass(frozen=True)
class Arch:
    """What the memory of one model depends on: parameters and the KV-cache shape (from its config.json)."""

    params_b: float          # total parameters, billions (vision tower included)
    layers: int              # num_hidden_layers
    kv_heads: int            # num_key_value_heads
    head_dim: int            # head_dim, or hidden_size / num_attention_heads
    max_ctx: int             # max_position_embeddings (vLLM's default max-model-len)
    vision_b: float = 0.0    # vision tower parameters (kept at 16 bits in Ollama's GGUFs)
    source: str = ""

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """K and V, every layer (Gemma 3's sliding-window layers counted as full: conservative)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes


def _hf(repo: str) -> str:
    return f"huggingface.co/{repo} config.json + model card"


# Architecture table: key -> Arch. Parameter counts from the model cards, the rest from config.json.
ARCHS: dict[str, Arch] = {
    "qwen2.5-0.5b": Arch(0.49, 24, 2, 64, 32768, source=_hf("Qwen/Qwen2.5-0.5B-Instruct")),
    "qwen2.5-1.5b": Arch(1.54, 28, 2, 128, 32768, source=_hf("Qwen/Qwen2.5-1.5B-Instruct")),
    "qwen2.5-3b": Arch(3.09, 36, 2, 128, 32768, source=_hf("Qwen/Qwen2.5-3B-Instruct")),
    "qwen2.5-7b": Arch(7.62, 28, 4, 128, 32768, source=_hf("Qwen/Qwen2.5-7B-Instruct")),
    "qwen2.5-14b": Arch(14.7, 48, 8, 128, 32768, source=_hf("Qwen/Qwen2.5-14B-Instruct")),
    "qwen2.5-32b": Arch(32.5, 64, 8, 128, 32768, source=_hf("Qwen/Qwen2.5-32B-Instruct")),
    "qwen2.5-72b": Arch(72.7, 80, 8, 128, 32768, source=_hf("Qwen/Qwen2.5-72B-Instruct")),
    "qwen2.5-vl-3b": Arch(3.75, 36, 2, 128, 128000, vision_b=0.67, source=_hf("Qwen/Qwen2.5-VL-3B-Instruct")),
    "qwen2.5-vl-7b": Arch(8.29, 28, 4, 128, 128000, vision_b=0.68, source=_hf("Qwen/Qwen2.5-VL-7B-Instruct")),
    "qwen2.5-vl-32b": Arch(33.5, 64, 8, 128, 128000, vision_b=0.68, source=_hf("Qwen/Qwen2.5-VL-32B-Instruct")),
    "qwen2.5-vl-72b": Arch(73.4, 80, 8, 128, 128000, vision_b=0.68, source=_hf("Qwen/Qwen2.5-VL-72B-Instruct")),
    "qwen3-0.6b": Arch(0.6, 28, 8, 128, 40960, source=_hf("Qwen/Qwen3-0.6B")),
    "qwen3-1.7b": Arch(1.7, 28, 8, 128, 40960, source=_hf("Qwen/Qwen3-1.7B")),
    "qwen3-4b": Arch(4.02, 36, 8, 128, 40960, source=_hf("Qwen/Qwen3-4B")),
    "qwen3-4b-2507": Arch(4.02, 36, 8, 128, 262144, source=_hf("Qwen/Qwen3-4B-Instruct-2507")),
    "qwen3-8b": Arch(8.19, 36, 8, 128, 40960, source=_hf("Qwen/Qwen3-8B")),
    "qwen3-14b": Arch(14.8, 40, 8, 128, 40960, source=_hf("Qwen/Qwen3-14B")),
    "qwen3-32b": Arch(32.8, 64, 8, 128, 40960, source=_hf("Qwen/Qwen3-32B")),
    "qwen3-30b-a3b": Arch(30.5, 48, 4, 128, 40960, source=_hf("Qwen/Qwen3-30B-A3B")),
    "llama3.2-1b": Arch(1.24, 16, 8, 64, 131072, source=_hf("meta-llama/Llama-3.2-1B-Instruct")),
    "llama3.2-3b": Arch(3.21, 28, 8, 128, 131072, source=_hf("meta-llama/Llama-3.2-3B-Instruct")),
    "llama3.1-8b": Arch(8.03, 32, 8, 128, 131072, source=_hf("meta-llama/Llama-3.1-8B-Instruct")),
    "llama3.1-70b": Arch(70.6, 80, 8, 128, 131072, source=_hf("meta-llama/Llama-3.3-70B-Instruct")),
    "gemma3-1b": Arch(1.0, 26, 1, 256, 32768, source=_hf("google/gemma-3-1b-it")),
    "gemma3-4b": Arch(4.3, 34, 4, 256, 131072, vision_b=0.42, source=_hf("google/gemma-3-4b-it")),
    "gemma3-12b": Arch(12.2, 48, 8, 256, 131072, vision_b=0.42, source=_hf("google/gemma-3-12b-it")),
    "gemma3-27b": Arch(27.4, 62, 16, 128, 131072, vision_b=0.42, source=_hf("google/gemma-3-27b-it")),
    "mistral-7b": Arch(7.25, 32, 8, 128, 32768, source=_hf("mistralai/Mistral-7B-Instruct-v0.3")),
}

# Hugging Face repo ids (lower-cased, org optional) -> architecture key.
HF_IDS: dict[str, str] = {
    "qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-1.5b-instruct": "qwen2.5-1.5b",
    "qwen2.5-3b-instruct": "qwen2.5-3b", "qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen2.5-14b-instruct": "qwen2.5-14b", "qwen2.5-32b-instruct": "qwen2.5-32b",
    "qwen2.5-72b-instruct": "qwen2.5-72b",
    "qwen2.5-vl-3b-instruct": "qwen2.5-vl-3b", "qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b",
    "qwen2.5-vl-32b-instruct": "qwen2.5-vl-32b", "qwen2.5-vl-72b-instruct": "qwen2.5-vl-72b",
    "qwen3-0.6b": "qwen3-0.6b", "qwen3-1.7b": "qwen3-1.7b", "qwen3-4b": "qwen3-4b", "qwen3-8b": "qwen3-8b",
    "qwen3-14b": "qwen3-14b", "qwen3-32b": "qwen3-32b", "qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen3-4b-instruct-2507": "qwen3-4b-2507", "qwen3-4b-thinking-2507": "qwen3-4b-2507",
    "llama-3.2-1b-instruct": "llama3.2-1b", "llama-3.2-3b-instruct": "llama3.2-3b",
    "llama-3.1-8b-instruct": "llama3.1-8b", "meta-llama-3.1-8b-instruct": "llama3.1-8b",
    "llama-3.1-70b-instruct": "llama3.1-70b", "llama-3.3-70b-instruct": "llama3.1-70b",
    "gemma-3-1b-it": "gemma3-1b", "gemma-3-4b-it": "gemma3-4b", "gemma-3-12b-it": "gemma3-12b",
    "gemma-3-27b-it": "gemma3-27b", "mistral-7b-instruct-v0.3": "mistral-7b",
}


@dataclass(frozen=True)
class OllamaTag:
    """A library tag at its default quantisation (Q4_K_M): the GGUF download is what gets loaded."""

    arch: str | None
    size_gb: float           # decimal GB as listed on ollama.com/library/<name>
    source: str = ""


def _lib(tag: str) -> str:
    return f"ollama.com/library/{tag} (download size)"


# Ollama library tags -> download size (what `ollama pull` fetches and the runner maps into memory).
OLLAMA_TAGS: dict[str, OllamaTag] = {
    "qwen2.5:0.5b": OllamaTag("qwen2.5-0.5b", 0.398, _lib("qwen2.5:0.5b")),
    "qwen2.5:1.5b": OllamaTag("qwen2.5-1.5b", 0.986, _lib("qwen2.5:1.5b")),
    "qwen2.5:3b": OllamaTag("qwen2.5-3b", 1.9, _lib("qwen2.5:3b")),
    "qwen2.5:7b": OllamaTag("qwen2.5-7b", 4.7, _lib("qwen2.5:7b")),
    "qwen2.5:14b": OllamaTag("qwen2.5-14b", 9.0, _lib("qwen2.5:14b")),
    "qwen2.5:32b": OllamaTag("qwen2.5-32b", 20.0, _lib("qwen2.5:32b")),
    "qwen2.5:72b": OllamaTag("qwen2.5-72b", 47.0, _lib("qwen2.5:72b")),
    "qwen2.5vl:3b": OllamaTag("qwen2.5-vl-3b", 3.2, _lib("qwen2.5vl:3b")),
    "qwen2.5vl:7b": OllamaTag("qwen2.5-vl-7b", 6.0, _lib("qwen2.5vl:7b")),
    "qwen2.5vl:32b": OllamaTag("qwen2.5-vl-32b", 21.0, _lib("qwen2.5vl:32b")),
    "qwen2.5vl:72b": OllamaTag("qwen2.5-vl-72b", 49.0, _lib("qwen2.5vl:72b")),
    "qwen3:0.6b": OllamaTag("qwen3-0.6b", 0.523, _lib("qwen3:0.6b")),
    "qwen3:1.7b": OllamaTag("qwen3-1.7b", 1.4, _lib("qwen3:1.7b")),
    "qwen3:4b": OllamaTag("qwen3-4b", 2.5, _lib("qwen3:4b")),
    "qwen3:8b": OllamaTag("qwen3-8b", 5.2, _lib("qwen3:8b")),
    "qwen3:14b": OllamaTag("qwen3-14b", 9.3, _lib("qwen3:14b")),
    "qwen3:30b": OllamaTag("qwen3-30b-a3b", 19.0, _lib("qwen3:30b")),
    "qwen3:32b": OllamaTag("qwen3-32b", 20.0, _lib("qwen3:32b")),
    "llama3.2:1b": OllamaTag("llama3.2-1b", 1.3, _lib("llama3.2:1b")),
    "llama3.2:3b": OllamaTag("llama3.2-3b", 2.0, _lib("llama3.2:3b")),
    "llama3.1:8b": OllamaTag("llama3.1-8b", 4.9, _lib("llama3.1:8b")),
    "llama3.1:70b": OllamaTag("llama3.1-70b", 43.0, _lib("llama3.1:70b")),
    "llama3.3:70b": OllamaTag("llama3.1-70b", 43.0, _lib("llama3.3:70b")),
    "gemma3:1b": OllamaTag("gemma3-1b", 0.815, _lib("gemma3:1b")),
    "gemma3:4b": OllamaTag("gemma3-4b", 3.3, _lib("gemma3:4b")),
    "gemma3:12b": OllamaTag("gemma3-12b", 8.1, _lib("gemma3:12b")),
    "gemma3:27b": OllamaTag("gemma3-27b", 17.0, _lib("gemma3:27b")),
    "mistral:7b": OllamaTag("mistral-7b", 4.1, _lib("mistral:7b")),
    "nomic-embed-text:latest": OllamaTag(None, 0.274, _lib("nomic-embed-text")),
    "mxbai-embed-large:latest": OllamaTag(None, 0.670, _lib("mxbai-embed-large")),
    "all-minilm:latest": OllamaTag(None, 0.046, _lib("all-minilm")),
    "bge-m3:latest": OllamaTag(None, 1.2, _lib("bge-m3")),
}

# A name without a size tag means the library's `latest`, which is this size.
OLLAMA_LATEST: dict[str, str] = {
    "qwen2.5": "qwen2.5:7b", "qwen2.5vl": "qwen2.5vl:7b", "qwen3": "qwen3:8b", "llama3.1": "llama3.1:8b",
    "llama3.2": "llama3.2:3b", "llama3.3": "llama3.3:70b", "gemma3": "gemma3:4b", "mistral": "mistral:7b",
}

# Effective bits per weight of a quantisation, embeddings and output layers included.
# Q4_K_M: llama3.1:8b is 4.9 GB for 8.03 B parameters (ollama.com) = 4.9 bits; the others from llama.cpp's
# quantize table (Q8_0 8.5, Q4_0 4.5, Q5_K_M 5.7, Q6_K 6.6 bpw). AWQ/GPTQ int4: 4 bits + group-128 scales,
# embeddings and lm_head left at 16 bits (about 5 bits overall).
QUANT_BITS: dict[str, float] = {
    "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q5_k_m": 5.7, "q6_k": 6.6, "q8_0": 8.5,
    "fp16": 16.0, "f16": 16.0, "bf16": 16.0, "fp32": 32.0, "f32": 32.0,
    "fp8": 8.5, "int8": 8.5, "awq": 5.0, "gptq": 5.0, "int4": 5.0, "bnb-4bit": 5.0, "bitsandbytes": 5.0,
}

# Embedding/reranker models the gateway serves itself (sentence-transformers, fp32): parameters, billions.
EMBEDDERS: dict[str, tuple[float, str]] = {
    "all-minilm-l6-v2": (0.0227, _hf("sentence-transformers/all-MiniLM-L6-v2")),
    "all-minilm-l12-v2": (0.0334, _hf("sentence-transformers/all-MiniLM-L12-v2")),
    "all-mpnet-base-v2": (0.109, _hf("sentence-transformers/all-mpnet-base-v2")),
    "multilingual-e5-small": (0.118, _hf("intfloat/multilingual-e5-small")),
    "multilingual-e5-base": (0.278, _hf("intfloat/multilingual-e5-base")),
    "multilingual-e5-large": (0.560, _hf("intfloat/multilingual-e5-large")),
    "bge-small-en-v1.5": (0.0334, _hf("BAAI/bge-small-en-v1.5")),
    "bge-base-en-v1.5": (0.109, _hf("BAAI/bge-base-en-v1.5")),
    "bge-large-en-v1.5": (0.335, _hf("BAAI/bge-large-en-v1.5")),
    "bge-m3": (0.568, _hf("BAAI/bge-m3")),
    "bge-reranker-v2-m3": (0.568, _hf("BAAI/bge-reranker-v2-m3")),
    "nomic-embed-text-v1.5": (0.137, _hf("nomic-ai/nomic-embed-text-v1.5")),
}

# Engine overheads (GiB), on top of weights and KV cache.
# Ollama: the runner's CUDA context and compute graph per loaded model (~0.3-0.5 GiB in `ollama ps` minus
# weights+KV on small models). vLLM: activation peak + CUDA graphs + CUDA context, per GPU; a vLLM startup
# log on an A10G reads "Model weights: 14.99 GiB | Activation memory: 0.85 GiB", CUDA graphs take ~0.5 GiB.
OLLAMA_OVERHEAD_GIB = 0.4
VLLM_OVERHEAD_GIB = 2.0
# The gateway's torch + sentence-transformers runtime, once, when it serves any model itself.
GATEWAY_TORCH_GIB = 0.5
# Defaults of the engines, where the config does not say (docs.ollama.com context-length and FAQ; vLLM docs).
OLLAMA_NUM_PARALLEL = 1
OLLAMA_CTX_TIERS = ((24.0, 4096), (48.0, 32768), (float("inf"), 262144))  # (VRAM GiB below, default num_ctx)
VLLM_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class JetsonSku:
    """A Jetson module: /proc/device-tree/model names the family; memory picks the size within it."""

    family: str
    match: str               # substring of the device-tree model string
    sizes: dict[int, float]  # nominal GB -> OS reserve GiB (kernel carve-outs, Ubuntu + services)


# Reserves: the carve-outs (MemTotal is ~0.6 GiB under nominal) plus a headless Ubuntu with Docker;
# the "Orin Nano 8 GB: about 5 GB usable after the OS" is the calibration point.
JETSON_SKUS: tuple[JetsonSku, ...] = (
    JetsonSku("Jetson AGX Orin", "agx orin", {32: 3.5, 64: 4.0}),
    JetsonSku("Jetson AGX Thor", "thor", {128: 6.0, 64: 5.0}),
    JetsonSku("Jetson Orin NX", "orin nx", {8: 2.5, 16: 3.0}),
    JetsonSku("Jetson Orin Nano", "orin nano", {4: 1.7, 8: 2.5}),
    JetsonSku("Jetson AGX Xavier", "agx xavier", {16: 3.0, 32: 3.5, 64: 4.0}),
    JetsonSku("Jetson Xavier NX", "xavier nx", {8: 2.5, 16: 3.0}),
)
# A board the table does not know, or no device tree: reserve this share of MemTotal (at least 2 GiB).
JETSON_GENERIC_RESERVE = (0.2, 2.0)
# dgpu host RAM kept for the OS, Docker and the gateway process when RAM-resident models are budgeted.
DGPU_RAM_RESERVE_GIB = 4.0

# GPU and board sizes offered in a "move it to a host with >= N GB" fix.
GPU_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141, 180)
