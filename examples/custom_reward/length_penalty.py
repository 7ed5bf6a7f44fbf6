"""A user reward function for the arithmetic task: the exact answer, minus a small penalty per extra
character after it. Use it without registering anything:

    tidal train examples/quickstart.yaml reward.function=examples/custom_reward/length_penalty.py:length_penalty

A reward function is fn(prompt: str, response: str, ground_truth: str) -> float. It may raise: the
sample is then counted in reward/num_errors and, by default, left out of the update
(reward.on_error). Keep the function and its helpers in this one file (only standard-library and
installed imports), or make a package and name it as 'my_pkg.my_module:my_fn'.
"""

from __future__ import annotations

PENALTY_PER_CHAR = 0.05


def length_penalty(prompt: str, response: str, ground_truth: str) -> float:
    text = response.strip()
    answer = text.split()[0] if text else ""
    if answer != ground_truth.strip():
        return 0.0
    return max(0.0, 1.0 - PENALTY_PER_CHAR * (len(text) - len(answer)))
