"""Per-model `params` from the config, split by who uses them.

- request defaults: filled into each chat request unless the caller set them (caller wins);
- gateway-only: image limits;
- vLLM flags: become `vllm serve` arguments in the compose file.
"""

from __future__ import annotations

from typing import Any, Mapping

# config param -> OpenAI-shaped request field (the Ollama adapter maps these on to its options)
_REQUEST = {
    "temperature": "temperature",
    "top-p": "top_p",
    "top-k": "top_k",
    "stop": "stop",
    "seed": "seed",
    "presence-penalty": "presence_penalty",
    "frequency-penalty": "frequency_penalty",
}
_OLLAMA_ONLY = {"num-ctx": "num_ctx", "keep-alive": "keep_alive"}
VLLM_FLAGS = ("gpu-memory-utilization", "max-model-len", "max-num-seqs", "dtype", "quantization",
              "tensor-parallel-size", "kv-cache-dtype", "enforce-eager", "trust-remote-code")


def request_defaults(params: Mapping[str, Any], engine: str) -> dict[str, Any]:
    """Body fields to set when absent. `max-tokens` is handled apart (two request spellings exist)."""
    out = {field: params[key] for key, field in _REQUEST.items() if key in params}
    if "repeat-penalty" in params:
        out["repetition_penalty" if engine == "vllm" else "repeat_penalty"] = params["repeat-penalty"]
    if engine == "ollama":
        out.update({field: params[key] for key, field in _OLLAMA_ONLY.items() if key in params})
    return out


def apply_defaults(body: dict[str, Any], defaults: Mapping[str, Any], max_tokens: int | None) -> None:
    for key, value in defaults.items():
        if body.get(key) is None:
            body[key] = value
    if max_tokens is not None and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens


def vllm_cli_args(params: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key in VLLM_FLAGS:
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, bool):
            if value:
                args.append(f"--{key}")
        else:
            args += [f"--{key}", str(value)]
    return args
