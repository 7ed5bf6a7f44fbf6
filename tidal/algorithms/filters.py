"""Data selection: which samples of a step train, and which of their tokens carry a policy gradient.

Two registries, one signature each:

    SAMPLE_FILTERS: fn(scores [N], *, group_ids, **params) -> (keep [N] bool, metrics)
    TOKEN_SELECTORS: fn(response_mask [N, R], *, entropy [N, R], advantages [N, R] | None, **params)
                     -> (mask [N, R], metrics)

`scores` is one number per sample: the sequence reward (what dynamic sampling looks at) or the
per-sample advantage. Within a prompt's group, GRPO/RLOO-style advantages are an increasing affine
map of the rewards, so selections that only compare samples of one group give the same answer
for either. Token selection is meant to run ONCE over the whole step on the driver (entropy from
`actor.compute_log_probs`), so every rank and micro-batch uses the same global threshold; the
returned mask then replaces `response_mask` in the policy-gradient term (and its counts are the
denominator), while entropy and KL terms keep the full mask.

`DynamicSamplingQuota` is the program's side of DAPO dynamic sampling (filter, then generate
again until the batch is full), and `linear_schedule` gives D3S its aggressive-to-relaxed ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch

from tidal.algorithms.advantages import group_rows
from tidal.algorithms.masked import masked_mean

SampleFilterFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
TokenSelectorFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def _check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"{name}={ratio} must be in (0, 1] (the fraction kept)")


def linear_schedule(step: int, *, start: float, end: float, num_steps: int) -> float:
    """start at step 0, moving linearly to end at `num_steps`, then end (num_steps <= 0: always end).

    D3S (arXiv 2509.22115) starts with aggressive down-sampling (small keep ratios) to learn fast
    from the most informative data, then relaxes towards keeping everything so the policy does not
    overfit to the high-signal subset; KDRL anneals its KL coefficient the same way.
    """
    if num_steps <= 0:
        return end
    progress = min(max(step, 0) / num_steps, 1.0)
    return start + (end - start) * progress


# ------------------------------------------------------------------------------- sample level


@torch.no_grad()
def zero_variance_groups(
    scores: torch.Tensor, *, group_ids: Sequence[Hashable] | torch.Tensor | None, atol: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476): drop groups whose rewards are all equal.

    A group whose samples all scored alike (all solved or all failed) has zero advantage
    everywhere: it adds no gradient, only shrinks the effective batch. Kept: groups with
    max - min > `atol`, and single-sample groups (nothing to compare; verl keeps them too).
    """
    keep = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    groups = group_rows(group_ids, len(scores), "zero_variance")
    num_kept = 0
    for rows in groups:
        index = torch.tensor(rows, device=scores.device)
        members = scores[index]
        if len(rows) == 1 or float(members.max() - members.min()) > atol:
            keep[index] = True
            num_kept += 1
    metrics = {
        "filter/num_groups": float(len(groups)),
        "filter/kept_group_fraction": num_kept / max(len(groups), 1),
    }
    return keep, metrics


def max_variance_subset(values: torch.Tensor, size: int) -> list[int]:
    """Indices of the `size` entries of `values` with the largest (population) variance.

    Some optimal subset is "the j smallest and the size - j largest": the variance is convex in
    each chosen value, so a chosen value with unchosen ones on both sides can be swapped for one
    of them without lowering it. Trying the size + 1 splits is exact (checked against brute force
    in the tests) and costs O(size^2) per group.
    """
    num = len(values)
    if not 1 <= size <= num:
        raise ValueError(f"subset size {size} must be in [1, {num}]")
    order = torch.sort(values, stable=True).indices.tolist()
    best, best_var = order[num - size :], -1.0
    for num_low in range(size + 1):
        chosen = order[:num_low] + order[num - (size - num_low) :]
        var = float(values[chosen].var(unbiased=False))
        if var > best_var + 1e-12:
            best, best_var = chosen, var
    return sorted(best)


@torch.no_grad()
def d3s_samples(
    scores: torch.Tensor, *, group_ids: Sequence[Hashable] | torch.Tensor | None, keep_ratio: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """D3S sample level (Wang et al. 2025, arXiv 2509.22115): per group, keep the subset maximising Var(A).

    Each group of n keeps k = clamp(ceil(keep_ratio * n), 2, n) samples (at least a pair, so the
    subset still contrasts good and bad). A larger Var(A) bounds the policy-gradient norm from
    above more loosely, i.e. the kept rollouts carry the strongest learning signal. Apply AFTER
    computing advantages on the full group, so the kept samples keep the full group's baseline.
    Take keep_ratio from `linear_schedule` for the dynamic (aggressive -> relaxed) variant.
    """
    _check_ratio("d3s keep_ratio", keep_ratio)
    keep = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    var_before, var_after = [], []
    for rows in group_rows(group_ids, len(scores), "d3s"):
        num = len(rows)
        size = min(num, max(2, math.ceil(keep_ratio * num - 1e-9)))
        members = scores[torch.tensor(rows, device=scores.device)]
        chosen = [rows[i] for i in max_variance_subset(members, size)]
        keep[torch.tensor(chosen, device=scores.device)] = True
        if num > 1:
            var_before.append(float(members.var(unbiased=False)))
            var_after.append(float(scores[torch.tensor(chosen, device=scores.device)].var(unbiased=False)))
    metrics = {
        "filter/d3s_kept_fraction": float(keep.float().mean()) if len(scores) else 0.0,
        "filter/d3s_group_var_before": sum(var_before) / max(len(var_before), 1),
        "filter/d3s_group_var_after": sum(var_after) / max(len(var_after), 1),
    }
    return keep, metrics


class DynamicSamplingQuota:
    """The program's half of DAPO dynamic sampling: collect filtered groups until the step is full.

    One quota per training step. Each generation round the program filters the new groups and
    asks `admit` which rows to take; rows of kept groups are taken whole, in order, until
    `target_groups` groups are in (the overflow of the last round is dropped, as DAPO does).

        quota = DynamicSamplingQuota(target_groups=prompts_per_step, max_rounds=max_rounds)
        while not quota.full:
            batch = score(generate(next_prompts()))
            keep, _ = SAMPLE_FILTERS.get("zero_variance")(batch["seq_reward"], group_ids=batch["uid"])
            parts.append(batch.index(quota.admit(keep, batch["uid"]).nonzero().squeeze(-1)))
        batch, metrics = Batch.concat(parts), quota.metrics()

    `max_rounds` = 0 means unlimited; otherwise a round that ends not full after `max_rounds`
    rounds raises, since the data (or the policy) yields no contrast and the loop would not end.
    """

    def __init__(self, target_groups: int, max_rounds: int = 0) -> None:
        if target_groups < 1:
            raise ValueError(f"dynamic sampling target_groups={target_groups} must be >= 1")
        if max_rounds < 0:
            raise ValueError(f"dynamic sampling max_rounds={max_rounds} must be >= 0 (0 = unlimited)")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.rounds = 0
        self.seen_groups = 0
        self.qualified_groups = 0
        self.kept_groups = 0

    @property
    def full(self) -> bool:
        return self.kept_groups >= self.target_groups

    def admit(self, keep: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
        """Rows [N] bool of this round to add to the step (kept groups, up to the quota)."""
        if self.full:
            raise ValueError("dynamic sampling quota is already full; stop generating and train")
        self.rounds += 1
        take = torch.zeros(len(keep), dtype=torch.bool, device=keep.device)
        for rows in group_rows(group_ids, len(keep), "dynamic sampling"):
            self.seen_groups += 1
            index = torch.tensor(rows, device=keep.device)
            kept_rows = index[keep[index]]
            if not len(kept_rows):
                continue
            self.qualified_groups += 1
            if not self.full:
                take[kept_rows] = True
                self.kept_groups += 1
        if not self.full and self.max_rounds and self.rounds >= self.max_rounds:
            raise ValueError(
                f"dynamic sampling kept {self.kept_groups} of {self.target_groups} groups after "
                f"max_rounds={self.max_rounds} generation rounds ({self.qualified_groups} of "
                f"{self.seen_groups} groups had varying rewards); raise max_rounds (0 = unlimited) or "
                "use prompts the policy sometimes solves and sometimes fails"
            )
        return take

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/seen_groups": float(self.seen_groups),
            "dynamic_sampling/qualified_fraction": self.qualified_groups / max(self.seen_groups, 1),
            "dynamic_sampling/kept_groups": float(self.kept_groups),
        }


# -------------------------------------------------------------------------------- token level


def top_fraction_mask(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask (response_mask's dtype) of the ceil(ratio * #valid) valid tokens with the largest score."""
    if scores.shape != response_mask.shape or scores.dim() != 2:
        raise ValueError(
            f"token scores {tuple(scores.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be [N, R]"
        )
    valid = response_mask > 0
    num_valid = int(valid.sum())
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_valid:
        num_keep = min(num_valid, math.ceil(ratio * num_valid - 1e-9))
        ranked = torch.where(valid, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float))
        selected[torch.topk(ranked.flatten(), num_keep).indices] = True
    return selected.view_as(response_mask).to(response_mask.dtype)


def _selection_metrics(
    prefix: str, mask: torch.Tensor, response_mask: torch.Tensor, scores: torch.Tensor
) -> dict[str, float]:
    chosen = mask > 0
    return {
        f"tokens/{prefix}_selected_fraction": float(masked_mean(chosen.float(), response_mask.float())),
        f"tokens/{prefix}_score_threshold": float(scores[chosen].min()) if chosen.any() else 0.0,
    }


@torch.no_grad()
def high_entropy_tokens(
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor,
    advantages: torch.Tensor | None = None,
    top_ratio: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forking tokens only (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939).

    Keep the policy gradient on the top `top_ratio` (default 20%) highest-entropy valid tokens of
    the batch: those are the few "forks" where the reasoning path is decided, and training only
    on them matches or beats full-gradient RLVR on large models.
    """
    _check_ratio("high_entropy top_ratio", top_ratio)
    mask = top_fraction_mask(entropy, response_mask, top_ratio)
    return mask, _selection_metrics("high_entropy", mask, response_mask, entropy)


@torch.no_grad()
def d3s_tokens(
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor,
    advantages: torch.Tensor | None,
    keep_ratio: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """D3S token level (arXiv 2509.22115): keep the top `keep_ratio` valid tokens by |A_t| * H_t.

    Tokens where the policy is uncertain (high entropy) AND the outcome matters (large |A|) move
    the policy most per unit of compute. Take keep_ratio from `linear_schedule`.
    """
    _check_ratio("d3s keep_ratio", keep_ratio)
    if advantages is None:
        raise ValueError(
            "token selector 'd3s' scores tokens by |advantage| x entropy: pass advantages [N, R]"
        )
    scores = advantages.abs() * entropy
    mask = top_fraction_mask(scores, response_mask, keep_ratio)
    return mask, _selection_metrics("d3s", mask, response_mask, scores)
