"""Pure tensor functions of the RL algorithms, in registries keyed by the names used in config.

    ADVANTAGE_ESTIMATORS.get("grpo")(token_rewards, response_mask, group_ids=uids, values=None, config=...)
    POLICY_LOSSES.get("vanilla")(log_probs, old_log_probs, advantages, mask, config=..., denominator=...)
    KL_ESTIMATORS.get("low_var_kl")(log_probs, ref_log_probs)
    aggregate_loss(loss_mat, mask, mode, denominator)
    value_loss(values, old_values, returns, mask, cliprange, mode, denominator)

Imports only torch (config types for hints only). Importing this package registers every name.
"""

from tidal.algorithms import cov_losses as _cov_losses  # noqa: F401  (registers names)
from tidal.algorithms import group_advantages as _group_advantages  # noqa: F401  (registers names)
from tidal.algorithms.advantages import ADVANTAGE_ESTIMATORS
from tidal.algorithms.aggregation import (
    LOSS_AGG_ALIASES,
    LOSS_AGG_MODES,
    GlobalCounts,
    aggregate_loss,
    count_valid,
    resolve_loss_agg_mode,
)
from tidal.algorithms.entropy import entropy_from_logits
from tidal.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
)
from tidal.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten
from tidal.algorithms.off_policy import masked_is, truncated_is_weights
from tidal.algorithms.policy_losses import POLICY_LOSSES
from tidal.algorithms.registry import Registry
from tidal.algorithms.value_loss import value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_ALIASES",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "GlobalCounts",
    "Registry",
    "aggregate_loss",
    "apply_kl_penalty",
    "build_kl_controller",
    "count_valid",
    "entropy_from_logits",
    "masked_is",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "resolve_loss_agg_mode",
    "truncated_is_weights",
    "value_loss",
]
