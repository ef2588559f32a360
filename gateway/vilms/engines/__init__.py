"""Engine adapters behind one small interface (`Engine`): chat, embed, ready."""

from __future__ import annotations

import aiohttp

from .base import ChatCall, EmbedResult, Engine
from .ollama import OllamaEngine
from .openai_compat import OpenAICompatEngine


def build_engines(session: aiohttp.ClientSession, total_timeout: float) -> dict[str, Engine]:
    """One adapter per engine kind; each is stateless apart from the shared client."""
    return {
        "ollama": OllamaEngine(session, total_timeout),
        "vllm": OpenAICompatEngine(session, total_timeout, kind="vllm"),
        "openai": OpenAICompatEngine(session, total_timeout, kind="openai"),
    }


__all__ = ["ChatCall", "EmbedResult", "Engine", "build_engines"]
