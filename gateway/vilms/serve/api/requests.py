"""Request shapes the gateway validates (strictly: no coercion), and the bounded body reader."""

from __future__ import annotations

import asyncio
import ctypes
from typing import Annotated, Any, Callable, Literal, Union

import orjson
from starlette.requests import ClientDisconnect
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator)

from vilms.serve.admission import BodyHold
from vilms.serve.api.bodies import LARGE, Bodies, Large, json_nodes, large, parse_large
from vilms.serve.api.jsonsplit import Invalid
from vilms.errors import BadRequest, GatewayError


Strict = ConfigDict(strict=True, extra="allow")  # no coercion: "false" is not a bool, 5 is not a string
Closed = ConfigDict(strict=True, extra="forbid")


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = Strict
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = Strict
    type: Literal["image_url"]
    image_url: ImageURL | str


class OtherPart(BaseModel):
    """Any other part type: refused later unless the operator lists it in media.part-types for the engine."""

    model_config = Strict
    type: str


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return None
    if not isinstance(kind, str):
        return "Other"  # which then refuses the non-string type
    return {"text": "Text", "image_url": "Image"}.get(kind, "Other")


Part = Annotated[Union[Annotated[TextPart, Tag("Text")], Annotated[ImagePart, Tag("Image")],
                       Annotated[OtherPart, Tag("Other")]], Discriminator(_part_kind)]


class FunctionCall(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = ""


class ToolCall(BaseModel):
    model_config = Strict
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _parts_limit(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        """Counted before the parts are validated: a huge list is refused in O(1)."""
        limit = (info.context or {}).get("max_parts")
        if limit is not None and isinstance(value, list) and len(value) > limit:
            raise ValueError(f"at most {limit} content parts per message (media.max-parts-per-message)")
        return handler(value)


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = Closed
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = Closed
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = Closed
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat], Field(discriminator="type")]


class FunctionDef(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: dict[str, str]


def counted_list(value: Any, info: ValidationInfo, key: str, what: str, setting: str) -> None:
    """A list refused by its length alone, before its items are validated (pydantic's cost is per item, on the loop)."""
    limit = (info.context or {}).get(key)
    if limit is not None and isinstance(value, list) and len(value) > limit:
        raise ValueError(f"at most {limit} {what} per request ({setting})")


class ToolsLimited(BaseModel):
    """`tools` counted against gateway.max-tools before pydantic walks them (chat and Responses share it)."""

    @field_validator("tools", mode="wrap", check_fields=False)
    @classmethod
    def _tools_limit(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        counted_list(value, info, "max_tools", "tools", "gateway.max-tools")
        return handler(value)


class ChatRequest(ToolsLimited):
    """Every field an engine adapter reads, strictly typed; handlers forward only bodies that passed this.

    Fields outside this model are refused (OpenAI's behaviour) unless the model's operator lists them in
    `params.request-fields` (e.g. vLLM's ignore_eos); num_ctx and keep_alive are operator-only.
    """

    model_config = Strict
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # OpenAI fields some SDK-based clients set; harmless to engines (which ignore what they do not serve)
    service_tier: str | None = Field(default=None, max_length=32)
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    modalities: list[Literal["text"]] | None = None

    @field_validator("messages", mode="wrap")
    @classmethod
    def _messages_limit(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        counted_list(value, info, "max_messages", "messages", "gateway.max-messages")
        return handler(value)


class EmbeddingRequest(BaseModel):
    model_config = Strict
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)


async def read_body(request: Any, limit: int, hold: BodyHold, timeout: float) -> bytes | bytearray:
    """The request body, refusing (413) anything over `limit` bytes before holding it all in memory.

    Bytes are charged to `hold` (the gateway-wide budget and the caller's share) as they arrive, never as
    declared: a trickling upload holds only what it sent. The caller releases the hold when done with the
    body, on every path. The whole read must finish within `timeout` seconds (408), so a trickling client
    holds nothing long; a client that leaves mid-body is a 499 (no traceback: nothing failed here).

    A body declared LARGE or more is copied chunk by chunk into one buffer of its declared size as it arrives
    (a bytearray: what the large road parses). Why not keep the chunks and join them: eight 64 MiB bodies of
    64 KiB chunks grew the allocator's heap by 512 MiB, and the free that gave it back shrank it in one call of
    30-50 ms with the GIL held (bench/bigbodies.py, one stall per burst); a buffer this size is mapped apart
    and unmapped whole, and each chunk is freed as soon as it is copied.
    """
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > limit:
        raise GatewayError(f"request body is larger than {limit} bytes", status=413, code="request_too_large")
    buffer = _unfilled(declared) if declared is not None and declared >= LARGE else None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit or (buffer is not None and size > len(buffer)):
                    raise GatewayError(f"request body is larger than {limit if buffer is None else len(buffer)} "
                                       "bytes", status=413, code="request_too_large")
                if chunk:
                    hold.take(len(chunk))
                    if buffer is None:
                        chunks.append(chunk)
                    else:
                        buffer[size - len(chunk):size] = chunk
    except TimeoutError:
        raise GatewayError(f"request body was not received within {timeout:g}s", status=408,
                           code="body_timeout") from None
    except ClientDisconnect:
        raise GatewayError("client closed the connection while sending the body", status=499,
                           type="client_closed", code="client_closed") from None
    if buffer is not None:
        return buffer if size == len(buffer) else buffer[:size]  # shorter: the HTTP parser refuses that first
    if len(chunks) == 1:
        return chunks[0]
    if size < LARGE:
        return b"".join(chunks)
    return await Bodies.run(_joined, chunks)  # a join this big drops the GIL; one thread: never 8 memcpys at once


_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype, _new_bytearray.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)


def _unfilled(size: int) -> bytearray:
    """A bytearray of `size` bytes never written (the C API's PyByteArray_FromStringAndSize(NULL, n)): its pages
    are mapped as the body fills them. bytearray(n) writes n zeros first: 64 MiB x 8 was a 250 ms stall."""
    return _new_bytearray(None, size)


def _joined(chunks: list[bytes]) -> bytes:
    """The chunks joined, and freed here in the body thread (a thousand 64 KiB chunks freed on the loop: ~5 ms).
    For a body sent without a Content-Length (chunked): rare, and bounded by the same limits."""
    joined = b"".join(chunks)
    chunks.clear()
    return joined


async def parse_body(raw: bytes, max_nodes: int | None, texts: bool = False) -> dict[str, Any]:
    """`parse_json` on the loop for the usual small body; a large one (bodies.large) is parsed in the body thread,
    in short calls (vilms.serve.api.bodies; `texts`: long chat message texts kept as the client's literals)."""
    if not large(raw):
        return parse_json(raw, max_nodes)
    return await Bodies.run(parse_large, raw, max_nodes, _loads, texts)


def parse_json(raw: bytes, max_nodes: int | None = None) -> dict[str, Any]:
    """Parse a body, refusing first (without parsing) one whose value count alone would hold the event
    loop: a 1.7 MB body of 80,000 tiny objects takes orjson 40-300 ms to materialise."""
    if not raw:
        raise BadRequest("request body is empty; send a JSON object", code="invalid_json")
    if max_nodes is not None and len(raw) > max_nodes and json_nodes(raw, 0, len(raw)) > max_nodes:
        raise BadRequest(f"request body holds more than {max_nodes} JSON values (gateway.max-json-nodes)",
                         code="too_many_json_values")
    return _loads(raw)


def _loads(raw: bytes, parse: Callable[[bytes], Any] = orjson.loads, brackets: int | None = None) -> dict[str, Any]:
    """orjson (or `parse`: the same value in pieces), then the checks on what it returned (an object, not nested
    too deep; `brackets`: the opening brackets in `raw`, when the caller counted them already)."""
    try:
        data = parse(raw)
    except (orjson.JSONDecodeError, Invalid) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    if (_brackets(raw) if brackets is None else brackets) > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    return data


MAX_DEPTH = 128  # orjson writes at most 255 levels: a deeper body parsed, then failed (500) when forwarded


def _brackets(raw: bytes, step: int = 1 << 20) -> int:
    """Opening brackets in `raw`, counted a mebibyte per call past the first (a count over a 64 MiB skeleton held
    the GIL 10-20 ms in the body thread)."""
    if len(raw) <= step:
        return raw.count(b"[") + raw.count(b"{")
    return sum(raw.count(b"[", i, i + step) + raw.count(b"{", i, i + step) for i in range(0, len(raw), step))


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit`; visits containers only, run only when the body holds more
    than `limit` brackets at all."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


async def checked(model: type[BaseModel], data: dict[str, Any], context: dict[str, Any] | None = None) -> Any:
    """`validated`, in the body thread for a body of many values (bodies.Large.many): pydantic-core holds the GIL
    per call but calls back into the Python validators of every message and part, where the GIL changes hands,
    so the loop waits milliseconds instead of the 0.3-0.5 s 60,000 parts take."""
    if type(data) is Large and data.many:
        return await Bodies.run_uncollected(validated, model, data, context)
    return validated(model, data, context)


def validated(model: type[BaseModel], data: dict[str, Any], context: dict[str, Any] | None = None) -> Any:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        raise BadRequest(f"{param or 'body'}: {first['msg']}", param=param or None, code="invalid_value") from exc


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and (part[:1].isupper() or "[" in part or part in ("str", "list", "int"))):
            out += ("." if out else "") + str(part)
    return out
