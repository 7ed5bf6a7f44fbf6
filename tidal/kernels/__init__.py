"""Fused ops that must not materialise [tokens x vocab] logits; a plain-torch reference beside each."""

from tidal.kernels.logprobs import token_log_probs
from tidal.kernels.reference import token_log_probs_reference

__all__ = ["token_log_probs", "token_log_probs_reference"]
