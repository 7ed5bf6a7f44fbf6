"""Small whole-step Ray tasks the stages run with `job.run_task`: join reward components, filter
groups, keep rows, lay out and attach reference rewards. Each is a plain function of Batches, so it
can be tested without Ray.

`run_task(fn, batch, *args)` calls `fn(batch.fetch(), *args)` inside a task; further
DistributedBatches among `args` are fetched in the task too, never on the driver.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tidal.algorithms.plugins import configured_plugins
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards.scorer import token_rewards_at_last_token


def combine_rewards(
    batch: Batch, components: Sequence[DistributedBatch | Batch], cfg: JobConfig
) -> tuple[Batch, dict[str, float]]:
    """One reward per sample from the scored components (`algorithm.reward_combination`).

    `batch` holds response_mask; component k holds seq_reward and reward_error of the k-th
    reward function. A sample's reward_error is the first component error, prefixed by its name.
    With gdpo, which normalises each component on its own, the [N, K] scores are kept as the column
    `reward_components` (in the order of `components`).
    """
    names = cfg.algorithm.reward_combination.components
    scored = [c.fetch() if isinstance(c, DistributedBatch) else c for c in components]
    stacked = torch.stack([s["seq_reward"].float() for s in scored], dim=1)
    reward, metrics = configured_plugins(cfg).reward_combiner(stacked)
    errors: list[str | None] = [None] * len(batch)
    for name, part in zip(names, scored):
        for i, error in enumerate(part["reward_error"]):
            if error is not None and errors[i] is None:
                errors[i] = f"{name}: {error}"
    columns = {
        "seq_reward": reward,
        "token_rewards": token_rewards_at_last_token(reward, batch["response_mask"]),
    }
    if cfg.algorithm.keeps_reward_components:
        columns["reward_components"] = stacked
    return Batch.from_dict(columns, {"reward_error": errors}), metrics


def filter_groups(batch: Batch, cfg: JobConfig) -> tuple[Batch, list[bool], list[str]]:
    """`algorithm.dynamic_sampling`'s filter on the sequence rewards: (keep column, keep, uids)."""
    uids = [str(uid) for uid in batch["uid"]]
    keep, _ = configured_plugins(cfg).dynamic_sampling_filter(batch["seq_reward"], group_ids=uids)
    return Batch.from_dict({"keep": keep}), keep.tolist(), uids


def keep_rows(
    first: Batch, rest: Sequence[DistributedBatch | Batch], keeps: Sequence[Sequence[bool]]
) -> Batch:
    """The rows of [first, *rest] whose `keeps` entry is True, concatenated in order."""
    batches = [first, *(b.fetch() if isinstance(b, DistributedBatch) else b for b in rest)]
    if len(keeps) != len(batches):
        raise ValueError(f"keep_rows got {len(keeps)} keep lists for {len(batches)} batches")
    kept = [b.index(np.flatnonzero(np.asarray(k, dtype=bool))) for b, k in zip(batches, keeps)]
    return Batch.concat(kept)


def reference_rows(prompts: Batch) -> Batch:
    """PAR's data baseline: one row per (prompt, reference response), ready to score like a response.

    The scorer reads prompt_text, response_text, ground_truth and response_mask; the mask (one real
    token) only places the reward, which this path never uses as a token reward.
    """
    if "reference_responses" not in prompts:
        raise ValueError(
            "the prompts carry no reference_responses; PAR baseline=data needs data.reference_response_key "
            "and prompts from data.train_files"
        )
    picks = [(i, ref) for i, refs in enumerate(prompts["reference_responses"]) for ref in refs]
    rows = [i for i, _ in picks]
    columns = {key: [prompts[key][i] for i in rows] for key in ("uid", "prompt_text", "ground_truth")}
    return Batch.from_dict(
        {"response_mask": torch.ones((len(picks), 1), dtype=torch.int64)},
        columns | {"response_text": [ref for _, ref in picks]},
    )


def attach_baselines(batch: Batch, scored: DistributedBatch | Batch) -> Batch:
    """`reward_baselines` for each sample, from the scored reference responses of its prompt (by uid).

    One reference per prompt (the greedy response) gives [N]; several (the data's) give [N, M],
    M the most any prompt has, padded with NaN where a prompt has fewer (PAR averages over the rest).
    """
    scored = scored.fetch() if isinstance(scored, DistributedBatch) else scored
    by_uid: dict[str, list[float]] = {}
    for uid, reward in zip(scored["uid"], scored["seq_reward"].tolist()):
        by_uid.setdefault(uid, []).append(reward)
    missing = [uid for uid in batch["uid"] if uid not in by_uid]
    if missing:
        raise ValueError(f"no greedy response or data reference was scored for prompts {missing[:3]}")
    per_sample = [by_uid[uid] for uid in batch["uid"]]
    width = max((len(r) for r in per_sample), default=1)
    if width == 1:
        return Batch.from_dict({"reward_baselines": torch.tensor([r[0] for r in per_sample])})
    padded = torch.full((len(per_sample), width), float("nan"))
    for i, rewards in enumerate(per_sample):
        padded[i, : len(rewards)] = torch.tensor(rewards)
    return Batch.from_dict({"reward_baselines": padded})
