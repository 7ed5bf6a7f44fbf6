"""Check the names a job picks from torch-side registries, before any process starts.

Kept apart from the schema so that loading a config stays torch-free; callers that are about to
train (the CLI, the Python API) run this right after validation.
"""

from __future__ import annotations

import importlib.util

from tidal.config.schema import JobConfig


def _check(field: str, value: str, known: list[str]) -> None:
    if value not in known:
        raise ValueError(f"{field}={value!r} is not registered; pick one of {sorted(known)}")


def check_registered_names(cfg: JobConfig) -> None:
    if importlib.util.find_spec("torch") is None:  # torch-free deploy tooling skips this check
        return
    from tidal.algorithms import (
        ADVANTAGE_ESTIMATORS,
        KL_ESTIMATORS,
        LOSS_AGG_ALIASES,
        LOSS_AGG_MODES,
        POLICY_LOSSES,
    )
    from tidal.config.loader import ConfigError
    from tidal.workers.rewards import REWARD_FUNCTIONS

    try:
        _check(
            "algorithm.advantage_estimator", cfg.algorithm.advantage_estimator, ADVANTAGE_ESTIMATORS.names()
        )
        _check("actor.policy_loss", cfg.actor.policy_loss, POLICY_LOSSES.names())
        agg_modes = [*LOSS_AGG_MODES, *LOSS_AGG_ALIASES]
        _check("actor.loss_agg_mode", cfg.actor.loss_agg_mode, agg_modes)
        _check("critic.loss_agg_mode", cfg.critic.loss_agg_mode, agg_modes)
        _check("actor.kl_loss_type", cfg.actor.kl_loss_type, KL_ESTIMATORS.names())
        _check("algorithm.kl_penalty", cfg.algorithm.kl_penalty, KL_ESTIMATORS.names())
        _check("reward.function", cfg.reward.function, REWARD_FUNCTIONS.names())
    except ValueError as err:
        raise ConfigError(f"invalid job configuration:\n  {err}") from None
