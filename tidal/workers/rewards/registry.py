"""Rule reward functions by name: `reward.function=arithmetic` picks one.

A reward function is `fn(prompt: str, response: str, ground_truth: str) -> float`, pure and cheap
enough to run thousands of times per step inside Ray tasks. It may raise: the scorer records an
error for that one sample, which `reward.on_error` then drops from the step (or scores
`reward.error_score`), so a malformed response never stops a run (tidal/workers/rewards/scorer.py).

`REWARD_FUNCTIONS` is a `tidal.registry.Registry`: the built-in names are declared in the torch-free
catalog (tidal/registry.py), so the config checks `reward.function` without importing this package.
A function registered from a user's own script (`@REWARD_FUNCTIONS.register("mine")`) is shipped to
the Ray workers by value, but the supported way to use your own function is a spec,
`reward.function=my_pkg.my_module:my_fn` or `path/to/file.py:my_fn`, which every worker loads
itself (tidal/workers/rewards/custom.py).
"""

from __future__ import annotations

from collections.abc import Callable

from tidal.registry import REWARD_FUNCTIONS

RewardFn = Callable[[str, str, str], float]

__all__ = ["REWARD_FUNCTIONS", "RewardFn"]
