"""Entrain: balanced microbatches for multimodal LLM training on uneven data."""

__version__ = "0.1.0"
