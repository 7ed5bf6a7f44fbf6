"""The actor: the policy being trained (FSDP2), its log-probs, its PPO-style update, its weights.

`update` reproduces a single-process update on each whole mini-batch: every loss term is
normalised by the mini-batch's GLOBAL token / sequence counts (all-reduced), so summing the
micro-batch losses of all ranks gives the mini-batch loss, and the engine undoes FSDP's gradient
average. Uneven and empty shares are fine: the engine pads ranks with zero-weight micro-batches.

On-policy fast path: when every sample gets exactly one optimizer step (one mini-batch, one
epoch), the policy that computes the loss IS the old policy, so `old_log_probs` would be the
update's own log-probs. A batch without that column is then trained with the current log-probs,
detached, as the old ones: the PPO ratio is exactly 1 and its gradient that of the log-probs, as
with a separately computed column, minus one forward pass over the data (TRL does the same with
num_iterations=1). With more steps per sample the old policy differs from the current one after
the first step, so the column is required.
"""

from __future__ import annotations

from functools import partial

import torch

from tidal.algorithms import POLICY_LOSSES, GlobalCounts
from tidal.algorithms.objective import actor_objective, kl_loss_coef
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.registry import TRAIN_ENGINES
from tidal.resharding.sync import WeightSource
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Collect, Dispatch, endpoint
from tidal.workers.engines.base import TrainEngine, TrainSpec

SEQUENCE_COLUMNS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
# Written by the advantage task when token selection or an off-policy correction is configured.
POLICY_GRADIENT_COLUMNS = ("pg_mask", "is_weights")


def log_prob_temperature(cfg: JobConfig) -> float:
    """The temperature the rollout sampled with (greedy, 0, scores with the plain softmax: 1.0)."""
    return cfg.rollout.sampling.temperature or 1.0


def columns_of(batch: Batch, keys: tuple[str, ...], role: str) -> dict[str, torch.Tensor]:
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"{role} needs batch columns {missing}; the batch has {batch.keys()}")
    return {key: batch[key] for key in keys}


class ActorRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        actor = cfg.actor
        spec = TrainSpec(
            kind="policy",
            model=cfg.model,
            optim=actor.optim,
            total_steps=cfg.trainer.total_steps * cfg.sizes.num_mini_batches * actor.epochs,
            gradient_checkpointing=actor.gradient_checkpointing,
        )
        self.engine: TrainEngine = TRAIN_ENGINES.get(actor.backend).for_role(spec, ctx)
        self.temperature = log_prob_temperature(cfg)
        self._rollout_gap: float | None = None  # actor/rollout_logprob_gap_max of the running update
        POLICY_LOSSES.get(actor.policy_loss)  # an unknown name fails here, not mid-update

    @endpoint(Dispatch.DP_SPLIT)
    def compute_log_probs(self, batch: Batch) -> Batch:
        """old_log_probs and entropy [n, R] of the response tokens under the current policy, and
        sum_pi_squared [n, R] (sum_v pi(v)^2) when the advantage estimator reads it (OTB)."""
        columns = columns_of(batch, SEQUENCE_COLUMNS, "actor.compute_log_probs")
        squares = self.cfg.algorithm.needs_sum_pi_squared
        extra = {"with_sum_pi_squared": True} if squares else {}  # PolicyModel then returns 3 outputs
        log_probs, entropy, *rest = self.engine.infer(
            columns,
            self.cfg.actor.micro_batch_size_per_rank,
            temperature=self.temperature,
            with_entropy=True,
            **extra,
        )
        out = {"old_log_probs": log_probs, "entropy": entropy}
        return Batch.from_dict(out | ({"sum_pi_squared": rest[0]} if squares else {}))

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.FIRST)
    def update(self, batch: Batch, step: int = 0) -> dict[str, float]:
        """Policy update on this step's data; metrics (prefixed `actor/`) are the same on every rank.

        Without an `old_log_probs` column the update is on-policy (module docstring). `step`, the
        training step, drives the KL-coefficient anneal (actor.kl_loss_coef_end, KDRL).
        """
        actor = self.cfg.actor
        on_policy = "old_log_probs" not in batch
        if on_policy:
            self._check_on_policy()
        keys = SEQUENCE_COLUMNS + ("advantages",) + (() if on_policy else ("old_log_probs",))
        keys += tuple(key for key in POLICY_GRADIENT_COLUMNS if key in batch)
        keys += ("rollout_log_probs",) if "rollout_log_probs" in batch else ()  # actor/rollout_kl
        if actor.use_kl_loss:
            keys += ("ref_log_probs",)
            if actor.kl_loss_correct_threshold is not None:
                keys += ("seq_reward",)
        loss_fn = partial(self._loss, on_policy=on_policy, kl_coef=kl_loss_coef(actor, step))
        self._rollout_gap = None
        metrics = self.engine.train(
            columns_of(batch, keys, "actor.update"),
            num_mini_batches=self.cfg.sizes.num_mini_batches,
            micro_batch_size=actor.micro_batch_size_per_rank,
            epochs=actor.epochs,
            loss_fn=loss_fn,
            count_masks=("pg_mask",) if "pg_mask" in batch else (),
            temperature=self.temperature,
            with_entropy=True,
        )
        if "rollout_log_probs" in batch and on_policy:  # every rank joins, with or without data
            (metrics["rollout_logprob_gap_max"],) = self.engine.all_reduce(
                [self._rollout_gap or 0.0], op=torch.distributed.ReduceOp.MAX
            )
        return {f"actor/{key}": value for key, value in metrics.items()}

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.FIRST)
    def update_preference(self, batch: Batch, sft: bool = False) -> dict[str, float]:
        """Offline step on preference pairs (algorithm.preference), or SFT on their chosen responses
        (`sft`, REDI's first stage); tidal/workers/roles/preference.py."""
        from tidal.workers.roles import preference

        return preference.update(self.engine, self.cfg, batch, sft=sft)

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.FIRST)
    def evaluate_preference(self, batch: Batch) -> dict[str, float]:
        """Preference loss, accuracy and margin on held-out pairs (`val/` metrics), no update."""
        from tidal.workers.roles import preference

        return preference.evaluate(self.engine, self.cfg, batch)

    def _check_on_policy(self) -> None:
        sizes, actor = self.cfg.sizes, self.cfg.actor
        if sizes.num_mini_batches != 1 or actor.epochs != 1:
            raise ValueError(
                "actor.update got a batch without old_log_probs. The current log-probs may stand in "
                "for them only when every sample gets exactly one optimizer step, but this config "
                f"gives {sizes.num_mini_batches} mini-batches (trainer.prompts_per_step="
                f"{sizes.prompts_per_step}, actor.mini_batch_prompts={actor.mini_batch_prompts}) and "
                f"actor.epochs={actor.epochs}. Compute old_log_probs first (actor.compute_log_probs), "
                "or use one mini-batch and one epoch."
            )

    def _loss(
        self,
        outputs: list[torch.Tensor | None],
        micro: dict[str, torch.Tensor],
        counts: GlobalCounts,
        *,
        on_policy: bool,
        kl_coef: float,
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        log_probs, entropy = outputs
        if "rollout_log_probs" in micro and on_policy:
            # Largest per-token |trainer - rollout| log-prob, measured only where every sample gets one
            # optimizer step (all micro-batches run before it): in sync mode both sides then hold the
            # same weights, so this is the engines' numerical disagreement (in streaming mode it also
            # holds the policy lag of stale samples).
            mask = micro["response_mask"].bool()
            gap = float((log_probs.detach() - micro["rollout_log_probs"]).abs()[mask].max()) if mask.any() else 0.0
            self._rollout_gap = max(self._rollout_gap or 0.0, gap)
        return actor_objective(
            log_probs,
            entropy,
            micro,
            counts,
            self.cfg.actor,
            on_policy=on_policy,
            kl_coef=kl_coef,
        )

    def export_weights(self) -> WeightSource:
        """This rank's shards as the source of a weight sync (no gather, no copy).

        The rollout resharder moves only what each rank lacks. Iterating the source instead
        yields full Hugging Face-named tensors, one at a time (a collective: every rank iterates
        it all).
        """
        return self.engine.weight_source()

    @endpoint(Dispatch.ALL)
    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer, schedule and RNG states under the folder `path`."""
        self.engine.save_checkpoint(path)

    @endpoint(Dispatch.ALL)
    def load_checkpoint(self, path: str) -> None:
        self.engine.load_checkpoint(path)
