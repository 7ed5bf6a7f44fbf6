"""Pure tensor functions of the RL algorithms, in registries keyed by the names used in config.

    ADVANTAGE_ESTIMATORS.get("grpo")(token_rewards, response_mask, group_ids=uids, values=None, config=...)
    POLICY_LOSSES.get("vanilla")(log_probs, old_log_probs, advantages, mask, config=..., denominator=...)
    KL_ESTIMATORS.get("low_var_kl")(log_probs, ref_log_probs)
    aggregate_loss(loss_mat, mask, mode, denominator)
    value_loss(values, old_values, returns, mask, cliprange, mode, denominator)

Objectives and data strategies from the seed papers (see docs/algorithms.md for the full table):

    REWARD_SHAPERS.get("overlong")(seq_reward, response_mask, group_ids=uids, **params)  # also
        # "length_penalty" (GRPO-lambda), "par" (preference as reward)
    REWARD_COMBINERS.get("min")(components [N, K], **params)    # weighted_sum, uncertainty_weighted
    SAMPLE_FILTERS.get("zero_variance")(seq_reward, group_ids=uids)  # DAPO; "d3s" (max Var(A))
    DynamicSamplingQuota(target_groups, max_rounds)              # DAPO's refill loop, program side
    TOKEN_SELECTORS.get("high_entropy")(response_mask, entropy=..., advantages=...)  # "d3s"
    PREFERENCE_LOSSES.get("dpo")(chosen_lp, chosen_mask, rejected_lp, rejected_mask, ...)  # simpo, redi
    kdrl_kl_loss(log_probs, teacher_log_probs, mask, ...)        # KDRL reverse KL term
    OFF_POLICY_CORRECTIONS.get("tis")(old_lp, rollout_lp, mask, **params)  # "mis", "decoupled"

The registries are instances of `tidal.registry.Registry`, declared with their metadata in the
torch-free catalog `tidal/registry.py` and re-exported here; each name's function is imported on its
first `get`. Config sections pick plug-ins by name: `bind(REGISTRY, section, "algorithm.x", step=...)`
(plugins.py). Imports only torch (config types for hints only).
"""

from tidal.algorithms.aggregation import (
    GlobalCounts,
    aggregate_loss,
    count_valid,
    resolve_loss_agg_mode,
)
from tidal.algorithms.distill import kdrl_beta, kdrl_kl_loss
from tidal.algorithms.entropy import entropy_from_logits
from tidal.algorithms.filters import DynamicSamplingQuota, linear_schedule
from tidal.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
)
from tidal.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten
from tidal.algorithms.off_policy import (
    decoupled_is_weights,
    masked_is,
    truncated_is_weights,
)
from tidal.algorithms.plugins import bind, call_accepting, plugin_kwargs
from tidal.algorithms.preference import sequence_log_probs, sft_loss
from tidal.algorithms.shaping import add_at_last_token
from tidal.algorithms.value_loss import value_loss
from tidal.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_ALIASES,
    LOSS_AGG_MODES,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    REWARD_COMBINERS,
    REWARD_SHAPERS,
    SAMPLE_FILTERS,
    TOKEN_SELECTORS,
    Registry,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_ALIASES",
    "LOSS_AGG_MODES",
    "OFF_POLICY_CORRECTIONS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REWARD_COMBINERS",
    "REWARD_SHAPERS",
    "SAMPLE_FILTERS",
    "TOKEN_SELECTORS",
    "AdaptiveKLController",
    "DynamicSamplingQuota",
    "FixedKLController",
    "GlobalCounts",
    "Registry",
    "add_at_last_token",
    "aggregate_loss",
    "apply_kl_penalty",
    "bind",
    "build_kl_controller",
    "call_accepting",
    "count_valid",
    "decoupled_is_weights",
    "entropy_from_logits",
    "kdrl_beta",
    "kdrl_kl_loss",
    "linear_schedule",
    "masked_is",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "plugin_kwargs",
    "resolve_loss_agg_mode",
    "sequence_log_probs",
    "sft_loss",
    "truncated_is_weights",
    "value_loss",
]
