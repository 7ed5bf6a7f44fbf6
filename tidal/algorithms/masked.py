"""Statistics over the valid (mask = 1) entries of a tensor, as verl's `torch_functional` defines them.

Padding must never leak into a mean or a variance: a batch of right-padded responses holds many
zeros that are not data. Values outside the mask may even be NaN or inf (e.g. log-probs of pad
tokens); they are replaced before any arithmetic so they cannot poison a sum.
"""

from __future__ import annotations

import torch


def masked_sum(
    values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of `values * mask` over `dim` (all dims when None); entries with mask 0 count as 0."""
    valid = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (valid * mask).sum(dim=dim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean over valid entries; 1e-8 in the denominator (verl's) makes an empty mask give 0, not NaN."""
    return masked_sum(values, mask, dim) / (mask.sum(dim=dim) + 1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all valid entries (Bessel-corrected when `unbiased`, which needs >= 2 of them)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(
                f"an unbiased masked variance needs at least 2 valid entries but the mask has {int(count)}; "
                "use a larger batch (or unbiased=False)"
            )
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with mean and unbiased var over valid entries.

    Entries outside the mask are transformed too (callers multiply by the mask when they need zeros).
    With `shift_mean=False` the mean is added back, which only rescales the spread.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened
