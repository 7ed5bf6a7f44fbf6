"""The critic's model: a causal-LM backbone (no lm_head) and a scalar value head.

The value of response position j is read at the token that predicts response token j (the state
before it is generated), exactly the positions whose log-probs the policy uses, so values and
log-probs line up token for token in [N, R].
"""

from __future__ import annotations

import torch
from torch import nn

from tidal.workers.engines.fsdp.packing import SequenceBatch


class ValueModel(nn.Module):
    """`forward(batch)` -> (values [K] float32,) at the batch's predicting positions (any layout)."""

    def __init__(self, backbone: nn.Module, seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        param = next(backbone.parameters())
        self.value_head = nn.Linear(config.hidden_size, 1, dtype=param.dtype, device=param.device)
        # Small, seeded init: every rank builds the same head before sharding, and a rerun with
        # the same trainer.seed starts from the same critic. Scale as the backbone's own init.
        std = float(getattr(config, "initializer_range", 0.02))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(self.value_head.weight.shape, generator=generator) * std
            self.value_head.weight.copy_(weight)
            self.value_head.bias.zero_()

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor]:
        out = self.backbone(**batch.model_inputs())
        hidden = batch.at_predictions(out.last_hidden_state)
        return (self.value_head(hidden).squeeze(-1).float(),)
