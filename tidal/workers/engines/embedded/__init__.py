"""The embedded rollout engine: batched sampling from a Hugging Face model inside the worker process."""

from tidal.workers.engines.embedded.continuous import ContinuousBatcher, GroupResult, Request
from tidal.workers.engines.embedded.engine import EmbeddedEngine, Generation, load_tokenizer
from tidal.workers.engines.embedded.streaming import StreamingGenerator

__all__ = [
    "ContinuousBatcher",
    "EmbeddedEngine",
    "Generation",
    "GroupResult",
    "Request",
    "StreamingGenerator",
    "load_tokenizer",
]
