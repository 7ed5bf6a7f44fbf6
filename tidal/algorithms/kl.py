"""KL divergence between the policy and the reference, per token, and the KL-in-reward penalty.

Estimators (J. Schulman, "Approximating KL divergence", 2020) of KL(pi || ref) from samples of pi,
with r = ref / pi evaluated at the sampled token:
- "kl" / "k1": log pi - log ref. Unbiased, high variance, can be negative.
- "abs": |log pi - log ref|.
- "mse" / "k2": 0.5 * (log pi - log ref)^2. Biased, low variance; its gradient is the right one.
- "low_var_kl" / "k3": r - log r - 1 >= 0. Unbiased, low variance. As in verl, log r is clamped to
  [-20, 20] before exp and the result to at most 10. It is computed as expm1(log r) - log r: in
  float32, exp(log r) - log r - 1 rounds to small NEGATIVE values for |log r| ~ 1e-7, which verl's
  lower clamp of -10 lets through; here the result is also clamped at 0 (same numbers otherwise).
- "<name>+" (e.g. "k3+", "low_var_kl+"): the VALUE of <name> with the GRADIENT of k2
  (straight-through). The expected gradient of k1/k3 is not the gradient of the KL; k2's is.

A KL term in the reward (PPO-RLHF style) is `apply_kl_penalty`; a KL term in the loss uses an
estimator directly and `aggregate_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from tidal.algorithms.masked import masked_mean
from tidal.registry import KL_ESTIMATORS

if TYPE_CHECKING:
    from tidal.config.schema import KLControlConfig

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs - ref_log_probs


def kl_abs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return (log_probs - ref_log_probs).abs()


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_probs - ref_log_probs).square()


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    log_r = torch.clamp(ref_log_probs - log_probs, min=-20.0, max=20.0)
    return torch.clamp(torch.expm1(log_r) - log_r, min=0.0, max=10.0)


def straight_through(forward: KLFn) -> KLFn:
    """Value of `forward`, gradient of k2."""

    def estimator(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
        k2 = kl_k2(log_probs, ref_log_probs)
        return k2 - k2.detach() + forward(log_probs, ref_log_probs).detach()

    estimator.__name__ = f"{forward.__name__}_straight_through"
    return estimator


# The "<name>+" entries of KL_ESTIMATORS (tidal/registry.py); k2's straight-through variant is k2 itself.
kl_k1_straight_through = straight_through(kl_k1)
kl_abs_straight_through = straight_through(kl_abs)
kl_k3_straight_through = straight_through(kl_k3)


# ------------------------------------------------------------------------------- KL in reward


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv 1909.08593): steer the coefficient so the KL tracks `target_kl`.

    value *= 1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL control needs target_kl > 0 and horizon > 0, got {target_kl} and {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient is the only state that changes; save it with the checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def build_kl_controller(config: KLControlConfig) -> FixedKLController | AdaptiveKLController:
    """The controller `algorithm.kl_ctrl` describes."""
    if config.type == "fixed":
        return FixedKLController(config.kl_coef)
    if config.type == "adaptive":
        return AdaptiveKLController(config.kl_coef, config.target_kl, config.horizon)
    raise ValueError(f"algorithm.kl_ctrl.type={config.type!r} is not one of 'fixed', 'adaptive'")


@torch.no_grad()
def apply_kl_penalty(
    token_rewards: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: torch.Tensor,
    kl_ctrl: KLController,
    name: str = "kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """token_rewards - beta * KL per token (masked), beta = kl_ctrl.value; then update the controller.

    As in verl: the KL estimate (`name` in KL_ESTIMATORS) is computed between the policy that
    generated the data (`log_probs`, i.e. old_log_probs) and the reference; the controller is
    updated in place with the batch KL (mean over sequences of the per-sequence token mean) and
    n_steps = N. Metrics: reward_kl_penalty (that KL) and reward_kl_penalty_coeff (beta used).
    """
    kl = KL_ESTIMATORS.get(name)(log_probs, ref_log_probs) * mask
    beta = kl_ctrl.value
    new_rewards = token_rewards - beta * kl
    current_kl = float(masked_mean(kl, mask, dim=-1).mean()) if len(kl) else 0.0
    kl_ctrl.update(current_kl=current_kl, n_steps=len(kl))
    return new_rewards, {"reward_kl_penalty": current_kl, "reward_kl_penalty_coeff": beta}
