"""Rewards: rule functions by name (registry) and the scorer that runs them over batches.

Importing this package registers the built-in functions, so a Ray worker that unpickles the
scorer sees the same names as the driver.
"""

from tidal.workers.rewards import arithmetic, math_verify  # noqa: F401  (registers the functions)
from tidal.workers.rewards.registry import REWARD_FUNCTIONS, RewardFn

__all__ = ["REWARD_FUNCTIONS", "RewardFn"]
