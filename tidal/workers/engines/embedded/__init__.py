"""The embedded rollout engine: batched sampling from a Hugging Face model inside the worker process."""

from tidal.workers.engines.embedded.continuous import ContinuousBatcher
from tidal.workers.engines.embedded.engine import EmbeddedEngine

__all__ = ["ContinuousBatcher", "EmbeddedEngine"]
