"""The advantage stage: shaping, KL-in-reward, the estimator, sample and token selection, in one
Ray task over the whole step (advantage_task.py says why whole-step and what runs in it)."""

from __future__ import annotations

from tidal.algorithms import AdaptiveKLController, FixedKLController
from tidal.config.schema import JobConfig
from tidal.controller.dispatch import run_task
from tidal.controller.stages.advantage_task import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, compute_advantages
from tidal.controller.stages.base import Stage, take_rows
from tidal.dataflow.distributed_batch import DistributedBatch


class Advantages(Stage):
    """Adds advantages, returns (and pg_mask / is_weights when configured); drops the rows that
    `algorithm.sample_selection` does not keep. `kl_ctrl`, the trainer's KL-in-reward controller,
    gives the task its coefficient and learns the measured KL back."""

    name = "advantages"
    reads = REQUIRED_COLUMNS
    optional_reads = OPTIONAL_COLUMNS
    writes = ("advantages", "returns", "token_rewards_total")
    optional_writes = ("pg_mask", "is_weights")  # token selection / off-policy correction

    def __init__(self, cfg: JobConfig, kl_ctrl: FixedKLController | AdaptiveKLController):
        self.cfg, self.kl_ctrl = cfg, kl_ctrl

    def __call__(self, batch: DistributedBatch, step: int) -> tuple[DistributedBatch, dict[str, float]]:
        adv, keep, metrics = run_task(compute_advantages, self.inputs(batch), self.cfg, self.kl_ctrl.value, step)
        if "kl/in_reward" in metrics:
            self.kl_ctrl.update(metrics["kl/in_reward"], len(batch))
        batch = batch.union(adv)
        if keep is not None and not all(keep):
            batch = take_rows([batch], [keep])
        return batch, metrics
