"""Embeddings: a local sentence-transformers engine with dynamic batching, and the response encoder."""
