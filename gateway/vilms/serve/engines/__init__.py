"""Engine adapters behind one small interface (`Engine`): chat, embed, ready."""

from __future__ import annotations

import math

from vilms.serve.engines.base import MAX_LINE_BYTES, MAX_REPLY_BYTES, ChatCall, EmbedResult, Engine
from vilms.serve.engines.ollama import OllamaEngine
from vilms.serve.engines.openai_compat import OpenAICompatEngine
from vilms.serve.upstream import Upstream


def build_engines(upstream: Upstream, total_timeout: float, max_reply: int = MAX_REPLY_BYTES,
                  max_line: int = MAX_LINE_BYTES, stream_timeout: float = math.inf) -> dict[str, Engine]:
    """One adapter per engine kind; each is stateless apart from the shared client and the reply bounds."""
    engines: dict[str, Engine] = {
        "ollama": OllamaEngine(upstream, total_timeout),
        "vllm": OpenAICompatEngine(upstream, total_timeout, kind="vllm"),
        "openai": OpenAICompatEngine(upstream, total_timeout, kind="openai"),
    }
    for engine in engines.values():
        engine.max_reply, engine.max_line, engine.stream_timeout = max_reply, max_line, stream_timeout
    return engines


__all__ = ["ChatCall", "EmbedResult", "Engine", "build_engines"]
