"""Every stage of a job, built once from the job's parts, and which of them a config runs.

    stages = Stages.build(cfg, cluster, state.kl_ctrl, data.val_prompts)
    stages.experience_order()   # [ReferenceLogProbs, OldLogProbs, Advantages] for GRPO with a KL loss

The optional experience stages follow from the config: a reference only when a KL term is on, the
trainer's log-probs when the data is off-policy or a token selector / correction reads them, a
critic only for estimators that need values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidal.config.schema import JobConfig
from tidal.controller.stages.advantages import Advantages
from tidal.controller.stages.base import Stage
from tidal.controller.stages.model import OldLogProbs, ReferenceLogProbs, UpdateActor, UpdateCritic, Values
from tidal.controller.stages.rollout import Evaluate, Generate
from tidal.controller.stages.scoring import FilterGroups, RewardBaselines, Score
from tidal.dataflow.batch import Batch

if TYPE_CHECKING:
    from tidal.algorithms import AdaptiveKLController, FixedKLController
    from tidal.controller.cluster import Cluster


def needs_old_log_probs(cfg: JobConfig) -> bool:
    """Whether the trainer recomputes the samples' log-probs before the update.

    An update with one optimizer step per sample and no KL in the reward skips the extra forward:
    the actor then uses its current log-probs, detached, as the old ones (ratio 1), which are the
    very values a recompute would give, stale data or not (streaming). A correction that reads
    the trainer's log-probs (decoupled PPO's proximal policy, TIS, token selection) recomputes them.
    The train/inference mismatch is logged either way: `actor/rollout_kl` from the update's own
    forward, and `rollout/mismatch_kl` when the recompute ran."""
    single_step = cfg.sizes.num_mini_batches == 1 and cfg.actor.epochs == 1
    return not single_step or cfg.algorithm.use_kl_in_reward or cfg.algorithm.needs_trainer_log_probs


@dataclass
class Stages:
    generate: Generate
    score: Score
    filter_groups: FilterGroups
    reward_baselines: RewardBaselines
    reference_log_probs: ReferenceLogProbs
    old_log_probs: OldLogProbs
    values: Values
    advantages: Advantages
    update_critic: UpdateCritic
    update_actor: UpdateActor
    evaluate: Evaluate
    cfg: JobConfig

    @classmethod
    def build(
        cls,
        cfg: JobConfig,
        cluster: Cluster,
        kl_ctrl: FixedKLController | AdaptiveKLController,
        val_prompts: Batch | None,
    ) -> Stages:
        generate, score = Generate(cfg, cluster), Score(cfg)
        return cls(
            generate=generate,
            score=score,
            filter_groups=FilterGroups(cfg),
            reward_baselines=RewardBaselines(cfg, generate, score),
            reference_log_probs=ReferenceLogProbs(cluster),
            old_log_probs=OldLogProbs(cluster),
            values=Values(cluster),
            advantages=Advantages(cfg, kl_ctrl),
            update_critic=UpdateCritic(cluster),
            update_actor=UpdateActor(cluster),
            evaluate=Evaluate(cfg, generate, score, val_prompts),
            cfg=cfg,
        )

    def experience_order(self) -> list[Stage]:
        """The stages after sampling (and the reward baselines) that this config runs, in order;
        each takes the batch and returns it with its columns added."""
        cfg = self.cfg
        order: list[Stage] = []
        if cfg.reference_enabled:
            order.append(self.reference_log_probs)
        if needs_old_log_probs(cfg):
            order.append(self.old_log_probs)
        if cfg.critic_enabled:
            order.append(self.values)
        return order
