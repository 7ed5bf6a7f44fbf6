"""Inputs the parity tests share."""

from __future__ import annotations

import torch


def holey_mask(g: torch.Generator, rows: int, cols: int, hole_share: float = 0.3) -> torch.Tensor:
    """[rows, cols] float64: ragged rows with interior holes (tool observations, about `hole_share`
    of positions), row 0 all masked, row 1 starting with a valid token."""
    mask = (torch.rand(rows, cols, generator=g) > hole_share).double()
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    mask *= (torch.arange(cols) < lengths.unsqueeze(1)).double()
    mask[0] = 0.0
    mask[1, 0] = 1.0
    return mask
