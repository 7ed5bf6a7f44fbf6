"""Offline preference training (algorithm.preference): the actor's update and evaluation on pairs,
and the reference's pair scoring for DPO.

The loss is the PREFERENCE_LOSSES entry the config names, with the section's parameters bound
(`bind_preference_loss`, the same binding the config check runs before any process starts). A
step on pairs (`update`) runs every pair's chosen and rejected response through the FSDP engine
together (tidal/workers/engines/fsdp/pairs.py); REDI's first stage (`update(sft=True)`) is plain
SFT on the chosen responses through the engine's own `train`. Metrics, the same on every rank:
`loss`; the loss's `preference/*` (implicit rewards of chosen and rejected, their margin and the
accuracy = fraction of pairs whose chosen reward is higher; REDI reports length-normalised
log-probs instead of rewards); `logps/chosen`, `logps/rejected` (summed response log-probs, as
TRL logs them); grad_norm and lr.
"""

from __future__ import annotations

import torch

from tidal.algorithms import GlobalCounts, sequence_log_probs, sft_loss
from tidal.config.registry_check import bind_preference_loss
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.workers.endpoint import Dispatch, endpoint
from tidal.workers.engines.base import TrainEngine
from tidal.workers.engines.fsdp.pairs import infer_pair_log_probs, run_pairs
from tidal.workers.roles.actor import columns_of
from tidal.workers.roles.reference import ReferenceRole

PAIR_COLUMNS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
REFERENCE_COLUMNS = ("ref_chosen_log_probs", "ref_rejected_log_probs")


class PairObjective:
    """The configured preference loss on one micro-batch of pairs (a `PairLossFn`)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.loss_fn = bind_preference_loss(cfg)

    def __call__(
        self, chosen: torch.Tensor, rejected: torch.Tensor, micro: dict[str, torch.Tensor], num_pairs: float
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        loss, metrics = self.loss_fn(
            chosen,
            micro["chosen_mask"],
            rejected,
            micro["rejected_mask"],
            ref_chosen_log_probs=micro.get("ref_chosen_log_probs"),
            ref_rejected_log_probs=micro.get("ref_rejected_log_probs"),
            denominator=num_pairs,
        )
        with torch.no_grad():
            metrics["logps/chosen"] = float(sequence_log_probs(chosen, micro["chosen_mask"], False).mean())
            metrics["logps/rejected"] = float(
                sequence_log_probs(rejected, micro["rejected_mask"], False).mean()
            )
        return loss, {"loss": float(loss.detach())}, metrics


def _sft_objective(
    outputs: list[torch.Tensor | None], micro: dict[str, torch.Tensor], counts: GlobalCounts
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """Token-mean NLL of the chosen responses over the whole mini-batch (an engine `LossFn`)."""
    log_probs, mask = outputs[0], micro["response_mask"]
    loss = sft_loss(log_probs, mask, "token-mean", denominator=counts)
    with torch.no_grad():
        chosen = float(sequence_log_probs(log_probs, mask, False).mean())
    return loss, {"loss": float(loss.detach())}, {"logps/chosen": chosen}


def pair_columns(batch: Batch, cfg: JobConfig, caller: str) -> dict[str, torch.Tensor]:
    """The pair columns, plus the reference log-probs when the loss compares with the reference."""
    keys = PAIR_COLUMNS + (REFERENCE_COLUMNS if cfg.reference_enabled else ())
    return columns_of(batch, keys, caller)


def update(engine: TrainEngine, cfg: JobConfig, batch: Batch, *, sft: bool = False) -> dict[str, float]:
    """One training step on this rank's pairs: the configured loss, or SFT on the chosen responses."""
    actor = cfg.actor
    if sft:
        columns = columns_of(batch, PAIR_COLUMNS, "actor.update_preference")
        metrics = engine.train(
            {
                "prompt_ids": columns["prompt_ids"],
                "prompt_mask": columns["prompt_mask"],
                "response_ids": columns["chosen_ids"],
                "response_mask": columns["chosen_mask"],
            },
            num_mini_batches=cfg.sizes.num_mini_batches,
            micro_batch_size=actor.micro_batch_size_per_rank,
            epochs=actor.epochs,
            loss_fn=_sft_objective,
            temperature=1.0,
            with_entropy=False,
        )
    else:
        metrics = run_pairs(
            engine,
            pair_columns(batch, cfg, "actor.update_preference"),
            micro_batch_size=actor.micro_batch_size_per_rank,
            loss_fn=PairObjective(cfg),
            num_mini_batches=cfg.sizes.num_mini_batches,
            epochs=actor.epochs,
        )
    return {f"actor/{key}": value for key, value in metrics.items()} | {"actor/sft_stage": float(sft)}


def evaluate(engine: TrainEngine, cfg: JobConfig, batch: Batch) -> dict[str, float]:
    """The configured loss and its preference metrics on held-out pairs, without gradients (`val/`)."""
    metrics = run_pairs(
        engine,
        pair_columns(batch, cfg, "actor.evaluate_preference"),
        micro_batch_size=cfg.actor.micro_batch_size_per_rank,
        loss_fn=PairObjective(cfg),
        train=False,
    )
    return {f"val/{key}": value for key, value in metrics.items()}


class PairReferenceRole(ReferenceRole):
    """The reference policy of a preference job: it also scores both responses of each pair."""

    @endpoint(Dispatch.DP_SPLIT)
    def compute_pair_ref_log_probs(self, batch: Batch) -> Batch:
        """ref_chosen_log_probs [n, R_c] and ref_rejected_log_probs [n, R_r] under the frozen policy."""
        columns = columns_of(batch, PAIR_COLUMNS, "reference.compute_pair_ref_log_probs")
        chosen, rejected = infer_pair_log_probs(
            self.engine, columns, self.cfg.reference.micro_batch_size_per_rank
        )
        return Batch.from_dict({"ref_chosen_log_probs": chosen, "ref_rejected_log_probs": rejected})
