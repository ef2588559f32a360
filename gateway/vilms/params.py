"""Per-model `params` from the config, split by who uses them.

- request defaults: filled into each chat request unless the caller set them (caller wins);
- operator caps (RequestPolicy): what a caller may not override;
- gateway-only: image limits;
- vLLM flags: become `vllm serve` arguments in the compose file.

Clamp or reject, per field: max_tokens / max_completion_tokens / min_tokens above the cap are clamped
(the answer is merely shorter: finish_reason "length"); n above the cap is a 400 (a client counting on n
choices must not silently get fewer); num_ctx and keep_alive in a request are a 400 (operator-only); any
other field outside the request model is a 400 unless the operator lists it in params.request-fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import BadRequest

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


OPERATOR_ONLY = {"num_ctx": "num-ctx", "keep_alive": "keep-alive"}
_CLAMPED = ("max_tokens", "max_completion_tokens", "min_tokens")


@dataclass(frozen=True)
class RequestPolicy:
    """Operator caps for one model, computed once at start-up."""

    max_tokens_cap: int
    max_n: int
    extra_fields: frozenset[str]
    fill_max_tokens: bool  # engines without their own bound (Ollama's num_predict defaults to unlimited)


def request_policy(params: Mapping[str, Any], engine: str, gateway: Mapping[str, Any]) -> RequestPolicy:
    return RequestPolicy(max_tokens_cap=params.get("max-tokens-cap", gateway["max-tokens-cap"]),
                         max_n=params.get("max-n", gateway["max-n"]),
                         extra_fields=frozenset(params.get("request-fields") or ()),
                         fill_max_tokens=engine == "ollama")


def enforce_policy(extra: Mapping[str, Any] | None, n: int | None, policy: RequestPolicy) -> None:
    """Refuse what the caller may not set: operator-only fields, unlisted extras, n over the cap."""
    for key in extra or ():
        if key in OPERATOR_ONLY:
            raise BadRequest(f"{key} is set by the operator (params.{OPERATOR_ONLY[key]}) and cannot be set per request",
                             param=key, code="operator_only_parameter")
        if key not in policy.extra_fields:
            raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key, code="unsupported_parameter")
    if n is not None and n > policy.max_n:
        raise BadRequest(f"n must be at most {policy.max_n} on this model", param="n", code="invalid_value")


def clamp_tokens(body: dict[str, Any], policy: RequestPolicy) -> None:
    """After defaults: token counts above the cap become the cap; Ollama always gets a bound."""
    cap = policy.max_tokens_cap
    for key in _CLAMPED:
        value = body.get(key)
        if isinstance(value, int) and value > cap:
            body[key] = cap
    if policy.fill_max_tokens and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cap
