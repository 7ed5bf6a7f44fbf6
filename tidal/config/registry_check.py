"""Check the names and plug-in parameters a job picks from torch-side registries, before any process starts.

Kept apart from the schema so that loading a config stays torch-free; callers that are about to
train (the CLI, the Python API) run this right after validation. Every message names the field,
the value and the fix.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from collections.abc import Iterable

from tidal.config.algorithm import PREFERENCE_PROGRAM_FIELDS
from tidal.config.schema import JobConfig


def _check(field: str, value: str, known: Iterable[str]) -> None:
    known = sorted(known)
    if value in known:
        return
    close = difflib.get_close_matches(value, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{field}={value!r} is not registered; {hint}pick one of {known}")


def _check_names(cfg: JobConfig) -> None:
    from tidal.algorithms import (
        ADVANTAGE_ESTIMATORS,
        KL_ESTIMATORS,
        LOSS_AGG_ALIASES,
        LOSS_AGG_MODES,
        POLICY_LOSSES,
    )
    from tidal.workers.rewards import REWARD_FUNCTIONS

    _check("algorithm.advantage_estimator", cfg.algorithm.advantage_estimator, ADVANTAGE_ESTIMATORS.names())
    _check("actor.policy_loss", cfg.actor.policy_loss, POLICY_LOSSES.names())
    agg_modes = [*LOSS_AGG_MODES, *LOSS_AGG_ALIASES]
    _check("actor.loss_agg_mode", cfg.actor.loss_agg_mode, agg_modes)
    _check("critic.loss_agg_mode", cfg.critic.loss_agg_mode, agg_modes)
    _check("actor.kl_loss_type", cfg.actor.kl_loss_type, KL_ESTIMATORS.names())
    _check("algorithm.kl_penalty", cfg.algorithm.kl_penalty, KL_ESTIMATORS.names())
    combination = cfg.algorithm.reward_combination
    if combination is None:
        function = _check_reward_function("reward.function", cfg.reward.function, REWARD_FUNCTIONS)
        if function != cfg.reward.function:
            cfg.reward.function = function
        return
    components = [
        _check_reward_function(f"algorithm.reward_combination.components.{i}", name, REWARD_FUNCTIONS)
        for i, name in enumerate(combination.components)
    ]
    if components != combination.components:
        combination.components = components
    if "function" in cfg.reward.model_fields_set:
        raise ValueError(
            f"reward.function={cfg.reward.function!r} is not used when algorithm.reward_combination is "
            "set; list it in algorithm.reward_combination.components and remove reward.function"
        )


def _check_reward_function(field: str, spec: str, registry) -> str:
    """A registered name, or a user function 'pkg.mod:fn' / 'path/file.py:fn' (loaded here and its
    signature checked). Returns the spec to store: a file path made absolute, so that the Ray
    workers, whatever their working directory, load the same file."""
    from tidal.workers.rewards import custom

    if not custom.is_custom_spec(spec):
        _check(field, spec, registry.names())
        return spec
    resolved = custom.absolute_spec(spec)
    try:
        custom.check_reward_function(resolved)
    except ValueError as err:
        raise ValueError(f"{field}={spec!r}: {err}") from None
    return resolved


def _check_plugins(cfg: JobConfig) -> None:
    """Bind every plug-in section (at the first and last step, so schedules are covered)."""
    from tidal.algorithms.plugins import configured_plugins

    for step in (0, cfg.trainer.total_steps):
        configured_plugins(cfg, step)
    if cfg.algorithm.preference is not None:
        bind_preference_loss(cfg)
    limit = cfg.rollout.sampling.max_new_tokens
    for i, section in enumerate(cfg.algorithm.reward_shaping):
        if section.type != "overlong":
            continue
        length = section.max_response_length or limit
        if section.buffer_length > length:
            raise ValueError(
                f"algorithm.reward_shaping.{i}.buffer_length={section.buffer_length} exceeds the length "
                f"limit {length} (max_response_length, default rollout.sampling.max_new_tokens); "
                "pick a window shorter than the limit, e.g. a quarter of it"
            )


def bind_preference_loss(cfg: JobConfig) -> functools.partial:
    """The PREFERENCE_LOSSES entry `algorithm.preference.type` names, with the section's parameters
    bound (the actor's preference update uses the same binding)."""
    from tidal.algorithms import PREFERENCE_LOSSES, bind

    section = cfg.algorithm.preference
    assert section is not None, "only preference jobs bind a preference loss"
    return bind(PREFERENCE_LOSSES, section, "algorithm.preference", exclude=PREFERENCE_PROGRAM_FIELDS)


def check_registered_names(cfg: JobConfig) -> None:
    if importlib.util.find_spec("torch") is None:  # torch-free deploy tooling skips this check
        return
    from tidal.config.loader import ConfigError

    try:
        _check_names(cfg)
        _check_plugins(cfg)
    except ValueError as err:
        raise ConfigError(f"invalid job configuration:\n  {err}") from None
