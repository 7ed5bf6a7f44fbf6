"""Rule reward functions by name: `reward.function=arithmetic` picks one.

A reward function is `fn(prompt: str, response: str, ground_truth: str) -> float`, pure and cheap
enough to run thousands of times per step inside Ray tasks. It may raise: the scorer records an
error for that one sample, which `reward.on_error` then drops from the step (or scores
`reward.error_score`), so a malformed response never stops a run (tidal/workers/rewards/scorer.py).

A function registered here from a user's own script is shipped to the Ray workers by value, but the
supported way to use your own function is a spec, `reward.function=my_pkg.my_module:my_fn` or
`path/to/file.py:my_fn`, which every worker loads itself (tidal/workers/rewards/custom.py).
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[str, str, str], float]


class RewardRegistry:
    def __init__(self) -> None:
        self._fns: dict[str, RewardFn] = {}

    def register(self, name: str) -> Callable[[RewardFn], RewardFn]:
        """Decorator; a name registered twice is a programming error and raises."""

        def decorator(fn: RewardFn) -> RewardFn:
            if name in self._fns:
                raise ValueError(f"reward function {name!r} is already registered; pick another name")
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> RewardFn:
        if name not in self._fns:
            raise ValueError(
                f"reward.function={name!r} is not a registered reward function; pick one of {list(self.names())}"
            )
        return self._fns[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._fns))

    def __contains__(self, name: object) -> bool:
        return name in self._fns


REWARD_FUNCTIONS = RewardRegistry()
