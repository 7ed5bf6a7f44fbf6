"""The reference policy: the initial model, frozen, FSDP2-sharded, scoring log-probs for KL terms."""

from __future__ import annotations

from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Dispatch, endpoint
from tidal.workers.engines.fsdp import (
    DTYPES,
    FSDPEngine,
    PolicyModel,
    block_types,
    choose_layout,
    load_pretrained,
)
from tidal.workers.roles.actor import SEQUENCE_COLUMNS, columns_of, log_prob_temperature


class ReferenceRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        # No optimizer, so no master copy: weights are stored in the compute dtype directly.
        dtype = DTYPES[cfg.model.dtype]
        layout, attention = choose_layout(ctx.device, dtype)
        lm = load_pretrained(cfg.model, dtype, attn_implementation=attention)
        lm.requires_grad_(False)
        self.engine = FSDPEngine(PolicyModel(lm), ctx, blocks=block_types(lm), layout=layout)
        self.temperature = log_prob_temperature(cfg)

    @endpoint(Dispatch.DP_SPLIT)
    def compute_ref_log_probs(self, batch: Batch) -> Batch:
        """ref_log_probs [n, R] of the response tokens under the reference policy."""
        columns = columns_of(batch, SEQUENCE_COLUMNS, "reference.compute_ref_log_probs")
        log_probs, _ = self.engine.infer(
            columns,
            self.cfg.reference.micro_batch_size_per_rank,
            temperature=self.temperature,
            with_entropy=False,
        )
        return Batch.from_dict({"ref_log_probs": log_probs})
