"""Request inputs in, OpenAI `CreateEmbeddingResponse` bytes out, straight from the float32 matrix.

float: orjson serialises each row as a numpy view (OPT_SERIALIZE_NUMPY), so no vector becomes a list of Python
floats; base64: each row's little-endian float32 bytes are encoded from a memoryview of the matrix (no per-row
copy), and when a row's byte length is a multiple of 3 the whole matrix is encoded in one call and cut per row.
"""

from __future__ import annotations

import binascii
from typing import Any, NamedTuple

import numpy as np
import orjson

from vilms.errors import BadRequest

MAX_INPUTS = 2048


class EmbeddingFields(NamedTuple):
    """The fields of an embeddings request the handler reads (what `EmbeddingRequest` would give it)."""

    model: str
    input: Any
    encoding_format: str
    dimensions: int | None


def plain_embedding_request(body: dict[str, Any]) -> EmbeddingFields | None:
    """The common request (text input, known fields of the right types) checked in one linear pass, or None when
    anything is unusual: then the strict pydantic model judges it and words the error. Validating a one-sentence
    request with pydantic cost more than the whole response encoding of its vector."""
    model, value = body.get("model"), body.get("input")
    encoding = body.get("encoding_format", "float")
    dimensions, user = body.get("dimensions"), body.get("user")
    if type(model) is not str or not model or encoding not in ("float", "base64"):
        return None
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        return None
    if user is not None and (type(user) is not str or len(user) > 256):
        return None
    if type(value) is str or (type(value) is list and value and all(type(t) is str for t in value)):
        return EmbeddingFields(model, value, encoding, dimensions)
    return None  # token ids, empty lists, wrong types: the model's path


def texts_from_input(value: Any) -> list[str]:
    """The request's `input` as a list of non-empty strings (token arrays are refused), checked in one pass."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise BadRequest("input must not be empty", param="input")
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"at most {MAX_INPUTS} inputs per request", param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest("input must be a string or a list of strings (token arrays are not accepted)",
                             param="input")
        if not text:
            raise BadRequest(f"input[{i}] is an empty string", param="input")
    return texts


def embedding_body(model: str, vectors: np.ndarray, tokens: int, encoding: str) -> bytes:
    """The JSON body for `vectors` (one row per input, in order) as `model`, `encoding` float or base64."""
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding == "base64":
        return _base64_body(model, matrix, tokens)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(matrix)]
    return orjson.dumps({"object": "list", "model": model, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def _base64_body(model: str, matrix: np.ndarray, tokens: int) -> bytes:
    rows, width = matrix.shape[0], matrix.shape[1] * 4
    raw = memoryview(matrix).cast("B")
    if width % 3 == 0:  # rows fall on base64 quantum boundaries: encode once, slice the text per row
        text = memoryview(binascii.b2a_base64(raw, newline=False))
        step = width // 3 * 4
        encoded = [text[i * step:(i + 1) * step] for i in range(rows)]
    else:
        encoded = [binascii.b2a_base64(raw[i * width:(i + 1) * width], newline=False) for i in range(rows)]
    items = b",".join([b'{"object":"embedding","index":%d,"embedding":"%b"}' % (i, row)
                       for i, row in enumerate(encoded)])
    usage = b'{"prompt_tokens":%d,"total_tokens":%d}' % (tokens, tokens)
    return b'{"object":"list","model":%b,"data":[%b],"usage":%b}' % (orjson.dumps(model), items, usage)
