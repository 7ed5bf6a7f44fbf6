"""vLLM rollout engine (engine.py) and its continuous batching for streaming (continuous.py).

Importing this package does not import vLLM; building a VLLMEngine does."""
