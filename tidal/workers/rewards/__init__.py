"""Rewards: rule functions by name (registry) and the scorer that runs them over batches.

The built-in names are declared in the catalog (tidal/registry.py) and imported on first use.
"""

from tidal.workers.rewards.registry import REWARD_FUNCTIONS, RewardFn

__all__ = ["REWARD_FUNCTIONS", "RewardFn"]
