"""The reference policy: frozen, FSDP2-sharded, scoring log-probs for KL terms. By default the initial
model; `reference.model_path` makes it another model of the same vocabulary (KDRL's teacher)."""

from __future__ import annotations

from tidal.config.schema import JobConfig, ModelConfig
from tidal.dataflow.batch import Batch
from tidal.registry import TRAIN_ENGINES
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Dispatch, endpoint
from tidal.workers.engines.base import TrainEngine, TrainSpec
from tidal.workers.roles.actor import SEQUENCE_COLUMNS, columns_of, log_prob_temperature


def reference_model(cfg: JobConfig) -> ModelConfig:
    """The model section the reference loads: model.path's, or reference.model_path's."""
    if cfg.reference.model_path is None:
        return cfg.model
    return cfg.model.model_copy(update={"path": cfg.reference.model_path, "build": None})


class ReferenceRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        # Frozen: no optimizer, so no master copy; the actor's training backend serves it.
        spec = TrainSpec(kind="frozen_policy", model=reference_model(cfg))
        self.engine: TrainEngine = TRAIN_ENGINES.get(cfg.actor.backend).for_role(spec, ctx)
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
