"""The critic: a value model (LM backbone + scalar head, FSDP2) and its clipped value-loss update.

Batching mirrors the actor: the step's data is cut into mini-batches (one optimizer step each;
`critic.mini_batch_prompts` sets their size like `actor.mini_batch_prompts`) and micro-batches,
with every loss normalised by the mini-batch's global token / sequence count.
"""

from __future__ import annotations

import math

import torch

from tidal.algorithms import GlobalCounts, value_loss
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.registry import TRAIN_ENGINES
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Collect, Dispatch, endpoint
from tidal.workers.engines.base import TrainEngine, TrainSpec
from tidal.workers.roles.actor import SEQUENCE_COLUMNS, columns_of


def critic_num_mini_batches(cfg: JobConfig) -> int:
    """Mini-batches per step for the critic (DerivedSizes covers the actor's)."""
    prompts = cfg.trainer.prompts_per_step
    mini_prompts = min(cfg.critic.mini_batch_prompts or prompts, prompts)
    return math.ceil(prompts / mini_prompts)


class CriticRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        critic = cfg.critic
        self.num_mini_batches = critic_num_mini_batches(cfg)
        spec = TrainSpec(
            kind="value",
            model=cfg.model,
            optim=critic.optim,
            total_steps=cfg.trainer.total_steps * self.num_mini_batches * critic.epochs,
            gradient_checkpointing=critic.gradient_checkpointing,
            seed=cfg.trainer.seed,
        )
        self.engine: TrainEngine = TRAIN_ENGINES.get(critic.backend).for_role(spec, ctx)

    @endpoint(Dispatch.DP_SPLIT)
    def compute_values(self, batch: Batch) -> Batch:
        """values [n, R]: the value of the state before each response token."""
        columns = columns_of(batch, SEQUENCE_COLUMNS, "critic.compute_values")
        (values,) = self.engine.infer(columns, self.cfg.critic.micro_batch_size_per_rank)
        return Batch.from_dict({"values": values})

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.FIRST)
    def update(self, batch: Batch) -> dict[str, float]:
        """Value update; `values` are the old values (for clipping), `returns` the targets."""
        critic = self.cfg.critic
        metrics = self.engine.train(
            columns_of(batch, SEQUENCE_COLUMNS + ("values", "returns"), "critic.update"),
            num_mini_batches=self.num_mini_batches,
            micro_batch_size=critic.micro_batch_size_per_rank,
            epochs=critic.epochs,
            loss_fn=self._loss,
        )
        return {f"critic/{key}": value for key, value in metrics.items()}

    def _loss(
        self, outputs: list[torch.Tensor | None], micro: dict[str, torch.Tensor], counts: GlobalCounts
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        critic = self.cfg.critic
        (values,) = outputs
        loss, metrics = value_loss(
            values,
            micro["values"],
            micro["returns"],
            micro["response_mask"],
            critic.cliprange_value,
            critic.loss_agg_mode,
            counts,
        )
        return loss, {"vf_loss": float(loss.detach())}, metrics

    @endpoint(Dispatch.ALL)
    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer, schedule and RNG states under the folder `path`."""
        self.engine.save_checkpoint(path)

    @endpoint(Dispatch.ALL)
    def load_checkpoint(self, path: str) -> None:
        self.engine.load_checkpoint(path)
