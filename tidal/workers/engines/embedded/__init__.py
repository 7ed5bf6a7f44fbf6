"""The embedded rollout engine: batched sampling from a Hugging Face model inside the worker process."""

from tidal.workers.engines.embedded.engine import EmbeddedEngine, Generation, load_tokenizer

__all__ = ["EmbeddedEngine", "Generation", "load_tokenizer"]
