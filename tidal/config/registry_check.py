"""Check the names a job picks from the registries, and bind their plug-in parameters.

Names are checked against the torch-free catalog (tidal/registry.py), so deploy tooling without
torch checks them too. Binding plug-in parameters to their functions and loading the user's own
reward functions need the training stack: they run only where torch is importable. Callers that are
about to train (the CLI, the Python API) run this right after validation. Every message names the
field, the value and the fix.
"""

from __future__ import annotations

import functools
import importlib.util

from tidal.config.algorithm import PREFERENCE_PROGRAM_FIELDS
from tidal.config.schema import JobConfig
from tidal.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_ALIASES,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    REWARD_FUNCTIONS,
    check_name,
)


def _check_names(cfg: JobConfig, *, load_custom: bool) -> None:
    """Every registered name the job picks; with `load_custom`, the user's reward functions too."""
    ADVANTAGE_ESTIMATORS.check("algorithm.advantage_estimator", cfg.algorithm.advantage_estimator)
    POLICY_LOSSES.check("actor.policy_loss", cfg.actor.policy_loss)
    agg_modes = [*LOSS_AGG_MODES, *LOSS_AGG_ALIASES]
    check_name("actor.loss_agg_mode", cfg.actor.loss_agg_mode, agg_modes)
    check_name("critic.loss_agg_mode", cfg.critic.loss_agg_mode, agg_modes)
    KL_ESTIMATORS.check("actor.kl_loss_type", cfg.actor.kl_loss_type)
    KL_ESTIMATORS.check("algorithm.kl_penalty", cfg.algorithm.kl_penalty)
    combination = cfg.algorithm.reward_combination
    if combination is None:
        function = _check_reward_function("reward.function", cfg.reward.function, load_custom)
        if function != cfg.reward.function:
            cfg.reward.function = function
        return
    components = [
        _check_reward_function(f"algorithm.reward_combination.components.{i}", name, load_custom)
        for i, name in enumerate(combination.components)
    ]
    if components != combination.components:
        combination.components = components
    if "function" in cfg.reward.model_fields_set:
        raise ValueError(
            f"reward.function={cfg.reward.function!r} is not used when algorithm.reward_combination is "
            "set; list it in algorithm.reward_combination.components and remove reward.function"
        )


def _check_reward_function(field: str, spec: str, load_custom: bool) -> str:
    """A registered name, or a user function 'pkg.mod:fn' / 'path/file.py:fn' (with `load_custom`,
    loaded here and its signature checked). Returns the spec to store: a file path made absolute,
    so that the Ray workers, whatever their working directory, load the same file."""
    from tidal.workers.rewards import custom  # torch-free

    if not custom.is_custom_spec(spec):
        REWARD_FUNCTIONS.check(field, spec)
        return spec
    if not load_custom:
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
    """Raise ConfigError for a name no registry holds, or a plug-in section that cannot bind."""
    from tidal.config.loader import ConfigError

    training_stack = importlib.util.find_spec("torch") is not None  # torch-free deploy tooling: names only
    try:
        _check_names(cfg, load_custom=training_stack)
        if training_stack:
            _check_plugins(cfg)
    except ValueError as err:
        raise ConfigError(f"invalid job configuration:\n  {err}") from None
