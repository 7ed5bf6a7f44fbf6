"""Small whole-step Ray tasks the stages run with `dispatch.run_task`: join reward components, decide
which samples a failed reward removes, filter groups, keep rows, lay out and attach reference rewards. Each is a plain function of Batches, so it
can be tested without Ray.

`run_task(fn, batch, *args)` calls `fn(batch.fetch(), *args)` inside a task; further
DistributedBatches among `args` are fetched in the task too, never on the driver.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from tidal.algorithms.plugins import configured_plugins
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards.custom import label
from tidal.workers.rewards.scorer import TIMEOUT_ERROR, token_rewards_at_last_token


def combine_rewards(
    batch: Batch, components: Sequence[DistributedBatch | Batch], cfg: JobConfig
) -> tuple[Batch, dict[str, float]]:
    """One reward per sample from the scored components (`algorithm.reward_combination`).

    `batch` holds response_mask; component k holds seq_reward and reward_error of the k-th
    reward function. A sample's reward_error is the first component error, prefixed by its name; a
    failed component carries the scorer's placeholder (reward.error_score with on_error=score).
    Metrics: the combiner's, and reward/mean (over the samples no component failed),
    reward/num_errors (samples with a failed component), reward/num_timeouts, reward/error_share.
    With gdpo, which normalises each component on its own, the [N, K] scores are kept as the column
    `reward_components` (in the order of `components`).
    """
    names = cfg.algorithm.reward_combination.components
    scored = [c.fetch() if isinstance(c, DistributedBatch) else c for c in components]
    stacked = torch.stack([s["seq_reward"].float() for s in scored], dim=1)
    reward, metrics = configured_plugins(cfg).reward_combiner(stacked)
    errors: list[str | None] = [None] * len(batch)
    timed_out = [False] * len(batch)
    for name, part in zip(names, scored):
        for i, error in enumerate(part["reward_error"]):
            if error is not None and errors[i] is None:
                errors[i] = f"{label(name)}: {error}"
            timed_out[i] = timed_out[i] or error == TIMEOUT_ERROR
    ok = torch.tensor([e is None for e in errors], dtype=torch.bool)
    num_errors = len(errors) - int(ok.sum())
    metrics = metrics | {
        "reward/mean": float(reward[ok].mean()) if bool(ok.any()) else 0.0,
        "reward/num_errors": float(num_errors),
        "reward/num_timeouts": float(sum(timed_out)),
        "reward/error_share": num_errors / len(errors) if errors else 0.0,
    }
    columns = {
        "seq_reward": reward,
        "token_rewards": token_rewards_at_last_token(reward, batch["response_mask"]),
    }
    if cfg.algorithm.keeps_reward_components:
        columns["reward_components"] = stacked
    return Batch.from_dict(columns, {"reward_error": errors}), metrics


def rows_to_keep(
    failed: Sequence[bool], uids: Sequence[Hashable], on_error: str, group_estimator: bool
) -> list[bool]:
    """Which samples stay in the step after their rewards were scored (`reward.on_error`).

    - score: every sample (the failed ones carry reward.error_score);
    - drop_group: the samples of prompts none of whose samples failed;
    - drop_sample: the samples that did not fail. The survivors of a group are a smaller (ragged)
      group, which every estimator handles as it handles groups thinned by sample selection. One
      exception: a group left with a single sample has no peer, and the group estimators would give
      it its raw reward as advantage (grpo, rloo, ...) or refuse it (grpo_passk), so with a group
      estimator (`group_estimator`) a lone survivor of a group that lost samples is dropped too.
    """
    if on_error == "score":
        return [True] * len(failed)
    bad = {uid for uid, f in zip(uids, failed) if f}
    if on_error == "drop_group":
        return [uid not in bad for uid in uids]
    keep = [not f for f in failed]
    if group_estimator:
        left = Counter(uid for uid, k in zip(uids, keep) if k)
        keep = [k and not (uid in bad and left[uid] < 2) for uid, k in zip(uids, keep)]
    return keep


def drop_failed_rewards(batch: Batch, cfg: JobConfig) -> tuple[Batch, list[bool]]:
    """`rows_to_keep` over a scored batch (uid, reward_error): (keep column, keep)."""
    failed = [error is not None for error in batch["reward_error"]]
    uids = [str(uid) for uid in batch["uid"]]
    group_estimator = cfg.algorithm.needs_group
    keep = rows_to_keep(failed, uids, cfg.reward.on_error, group_estimator)
    return Batch.from_dict({"keep": torch.tensor(keep, dtype=torch.bool)}), keep


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
    """`reward_baselines` for each sample (`attach_baselines_keeping` without dropping)."""
    return attach_baselines_keeping(batch, scored)[0]


def attach_baselines_keeping(
    batch: Batch, scored: DistributedBatch | Batch, drop_failed: bool = False
) -> tuple[Batch, list[bool]]:
    """`reward_baselines` for each sample, from the scored reference responses of its prompt (by
    uid), and which samples keep a baseline.

    One reference per prompt (the greedy response) gives [N]; several (the data's) give [N, M],
    M the most any prompt has, padded with NaN where a prompt has fewer (PAR averages over the rest).
    With `drop_failed` (reward.on_error drop_sample / drop_group) a reference whose reward failed is
    left out, and the samples of a prompt with no reference left are not kept (their baseline is a
    placeholder 0); otherwise a failed reference counts with its reward.error_score.
    """
    scored = scored.fetch() if isinstance(scored, DistributedBatch) else scored
    by_uid: dict[str, list[float]] = {}
    errors = scored["reward_error"] if "reward_error" in scored else [None] * len(scored)
    for uid, reward, error in zip(scored["uid"], scored["seq_reward"].tolist(), errors):
        rewards = by_uid.setdefault(uid, [])
        if error is None or not drop_failed:
            rewards.append(reward)
    missing = [uid for uid in batch["uid"] if uid not in by_uid]
    if missing:
        raise ValueError(f"no greedy response or data reference was scored for prompts {missing[:3]}")
    keep = [bool(by_uid[uid]) for uid in batch["uid"]]
    per_sample = [by_uid[uid] or [0.0] for uid in batch["uid"]]
    width = max((len(r) for r in per_sample), default=1)
    if width == 1:
        return Batch.from_dict({"reward_baselines": torch.tensor([r[0] for r in per_sample])}), keep
    padded = torch.full((len(per_sample), width), float("nan"))
    for i, rewards in enumerate(per_sample):
        padded[i, : len(rewards)] = torch.tensor(rewards)
    return Batch.from_dict({"reward_baselines": padded}), keep
