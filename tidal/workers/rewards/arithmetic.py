"""Exact-match reward for the built-in arithmetic task."""

from __future__ import annotations

import re

# The answer ends at the first whitespace or special token ("<|endoftext|>", "<|im_end|>", "</s>"),
# in case the response text was decoded with its special tokens.
_ANSWER_END = re.compile(r"\s|<\||</s>")


def extract_answer(response: str) -> str:
    return _ANSWER_END.split(response.strip(), maxsplit=1)[0]


def arithmetic_reward(prompt: str, response: str, ground_truth: str) -> float:
    """1.0 if the response's first word is exactly the ground truth ("82" for "37+45="), else 0.0."""
    return 1.0 if extract_answer(response) == ground_truth.strip() else 0.0
