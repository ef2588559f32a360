"""vilms: an OpenAI-compatible gateway for Ollama / vLLM engines on GPU servers and Jetson boxes."""

__version__ = "0.1.0"
