"""Clipped value-function loss for the critic (PPO; verl's `compute_value_loss`)."""

from __future__ import annotations

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    mode: str = "token-mean",
    denominator: Denominator = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * aggregate(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)).

    `values` carry the gradient (current critic), `old_values` are the critic's values when the
    data was collected, `returns` the targets. Clipping keeps one update from moving the value far
    from where the advantages were computed; taking the max makes it pessimistic. Metrics:
    vf_clipfrac (fraction of tokens where the clipped term is larger), vpred_mean.
    """
    if cliprange <= 0:
        raise ValueError(f"critic.cliprange_value={cliprange} must be positive")
    clipped_values = torch.maximum(torch.minimum(values, old_values + cliprange), old_values - cliprange)
    losses_unclipped = (values - returns) ** 2
    losses_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(losses_unclipped, losses_clipped), mask, mode, denominator)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": float(masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), mask)),
            "vpred_mean": float(masked_mean(values, mask)),
        }
    return loss, metrics
