"""Math answers checked symbolically with the `math-verify` package (0/1).

The response's answer is its last \\boxed{...} or, failing that, its last number or expression
(math-verify's default extraction); the ground truth may be plain ("72", "1/2") or LaTeX.
"""

from __future__ import annotations

import threading

TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere the
    # scorer's per-chunk Ray timeout is the guard.
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def math_verify_reward(prompt: str, response: str, ground_truth: str) -> float:
    # Imported on first use: sympy takes seconds to import, which every reward worker would pay.
    from math_verify import parse, verify

    timeout = _timeout()
    gold = parse(ground_truth, parsing_timeout=timeout) or parse(f"${ground_truth}$", parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {ground_truth!r}")
    answer = parse(response, parsing_timeout=timeout)
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=timeout) else 0.0
