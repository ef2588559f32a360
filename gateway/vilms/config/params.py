"""Per-model `params` from the config, split by who uses them.

- request defaults: filled into each chat request unless the caller set them (caller wins);
- operator caps (RequestPolicy): what a caller may not override;
- gateway-only: image limits;
- vLLM flags: become `vllm serve` arguments in the compose file;
- `stream` (the seed's key): how a request that leaves out `stream` is answered; the request's own always wins.

Clamp or reject, per field: max_tokens / max_completion_tokens / min_tokens above the cap are clamped
(the answer is merely shorter: finish_reason "length"); n above the cap is a 400 (a client counting on n
choices must not silently get fewer); num_ctx and keep_alive in a request are a 400 (operator-only); any
other field outside the request model is a 400 unless the operator lists it in params.request-fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vilms.config.schema import ConfigIssue
from vilms.errors import BadRequest

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


def request_stream(body: dict[str, Any], default: bool) -> bool:
    """Whether to answer as a stream: the request's own `stream` always wins (a validated bool by now).

    Only a request that leaves `stream` out (or sends null) gets the model's `params.stream`, the seed's key; a
    default of true is written into the body, which engines receive as it is, so they are asked for the same.
    """
    given = body.get("stream")
    if given is not None:
        return bool(given)
    if default:
        body["stream"] = True
    return default


def stream_issues(spec_pointer: str, params: Mapping[str, Any]) -> list[ConfigIssue]:
    """params.stream: true answers requests that omit `stream` with SSE, which OpenAI SDKs do not expect then."""
    if params.get("stream") is not True:
        return []
    return [ConfigIssue(f"{spec_pointer}/params", "params.stream: true streams every request that leaves out "
                        "`stream`; OpenAI clients leave it out when they want one JSON answer and then fail to parse",
                        "remove it (false is the default) and let clients send stream: true", severity="warning")]


OPERATOR_ONLY = {"num_ctx": "num-ctx", "keep_alive": "keep-alive"}
_CLAMPED = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
# Engine-side knobs no OpenAI route takes: vLLM accepts them on every route it serves, so the routes that pass
# unknown fields through (completions, responses, rerank) refuse these unless the operator lists them in
# params.request-fields, as chat (which refuses every unknown field) does. best_of 64 multiplies the work; a
# priority of -1000 jumps the engine's queue; prompt_embeds and kv_transfer_params reach engine internals.
ENGINE_INTERNAL = frozenset({
    "best_of", "priority", "ignore_eos", "prompt_embeds", "kv_transfer_params", "min_tokens", "use_beam_search",
    "length_penalty", "allowed_token_ids", "bad_words", "logits_processors", "vllm_xargs", "cache_salt",
    "truncate_prompt_tokens", "add_special_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "return_tokens_as_token_ids", "return_token_ids", "request_id", "mm_processor_kwargs", "chat_template",
    "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "structural_tag", "prompt_logprobs", "min_p", "repetition_penalty", "top_k",
    "stop_token_ids", "include_stop_str_in_output", "detokenize", "echo_prompt", "raw", "template", "context",
    "options", "images", "think", "format", "suffix_tokens",
} - {"min_p", "repetition_penalty", "top_k"})  # sampling knobs chat takes too; harmless


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


def enforce_policy(extra: Mapping[str, Any] | None, n: Any, policy: RequestPolicy) -> None:
    """Refuse what the caller may not set: operator-only fields, unlisted extras, n over the cap.

    Every route calls this: chat with all its unknown fields as `extra`, the pass-through routes with the
    fields that are operator-only or engine-internal (refused_fields), so the refusal list is one list.
    """
    for key in extra or ():
        if key in OPERATOR_ONLY:
            raise BadRequest(f"{key} is set by the operator (params.{OPERATOR_ONLY[key]}) and cannot be set per request",
                             param=key, code="operator_only_parameter")
        if key not in policy.extra_fields:
            raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key, code="unsupported_parameter")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > policy.max_n:
        raise BadRequest(f"n must be at most {policy.max_n} on this model", param="n", code="invalid_value")


def refused_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a pass-through body that enforce_policy must judge: operator-only and engine-internal ones."""
    return {key: body[key] for key in body if key in OPERATOR_ONLY or key in ENGINE_INTERNAL}


def _number(value: Any) -> float | None:
    """A token count as a number, whatever JSON type carried it (1e9, "1e9"); None when it is no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def clamp_tokens(body: dict[str, Any], policy: RequestPolicy) -> None:
    """After defaults: token counts above the cap become the cap, whether sent as an int, a float or a numeric
    string (engines coerce them); `null` means "no limit of mine", so it becomes the cap too (min_tokens: null
    is dropped). Ollama always gets a bound."""
    cap = policy.max_tokens_cap
    for key in _CLAMPED:
        if key not in body:
            continue
        value = body[key]
        if value is None:
            if key == "min_tokens":
                del body[key]
            else:
                body[key] = cap
            continue
        number = _number(value)
        if number is not None and not number <= cap:  # NaN and inf included
            body[key] = cap
    if policy.fill_max_tokens and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cap
