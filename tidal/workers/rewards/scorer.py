"""Score a batch with a reward function, locally or as parallel Ray tasks.

Failures are per sample: a function that raises gives that sample a `reward_error`
("ExcType: message"), one that returns NaN or inf the error "NonFiniteReward: returned nan", and a
chunk of samples that runs past `reward.timeout_s` the error "timeout". A failed sample's reward is
`reward.error_score` with `reward.on_error=score`, else 0 (a placeholder: the training program
drops such samples before advantages; tidal/controller/stages/scoring.py `Score.drop_failed`). The
scorer itself never stops: it counts (reward/num_errors, reward/num_timeouts, reward/error_share),
logs the first error of each kind once per process with an example sample, and leaves the
decision to the program (`check_error_share`).

The function is a registered name or a user spec ('pkg.mod:fn', 'path/file.py:fn'); a spec is
resolved inside each task (tidal/workers/rewards/custom.py says how the workers find the code).
"""

from __future__ import annotations

import logging
import math
import time

import ray
import torch

from tidal.config.schema import RewardConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards import custom
from tidal.workers.rewards.registry import REWARD_FUNCTIONS, RewardFn

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("prompt_text", "response_text", "ground_truth", "response_mask")
# Rule rewards are light; a small CPU share lets them run beside the worker actors that hold the
# cluster's whole CPUs.
TASK_NUM_CPUS = 0.25
TIMEOUT_ERROR = "timeout"
NON_FINITE = "NonFiniteReward"
EXAMPLE_CHARS = 200  # of the prompt and the response shown with a first error

# (function label, error kind) pairs already logged by this process: each kind is logged once.
_LOGGED_KINDS: set[tuple[str, str]] = set()


class RewardFailureError(RuntimeError):
    """Too many of a step's rewards failed (reward.max_error_share): the reward function is broken."""


def token_rewards_at_last_token(seq_reward: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N,R]: each sample's reward on its last real response token, zeros elsewhere.

    A response with no real token (an empty generation) has nowhere to carry its reward and gets a
    row of zeros; its `seq_reward` still holds the value.
    """
    mask = response_mask.bool()
    num_cols = mask.shape[1]
    last = num_cols - 1 - mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)
    out = torch.zeros(mask.shape, dtype=torch.float32)
    rows = torch.nonzero(mask.any(dim=1)).squeeze(1)
    out[rows, last[rows]] = seq_reward[rows].to(torch.float32)
    return out


def error_kind(error: str) -> str:
    """'ZeroDivisionError: division by zero' -> 'ZeroDivisionError'; 'timeout' -> 'timeout'."""
    return error.split(":", 1)[0]


def describe_error(fn_label: str, error: str, timeout_s: float | None = None) -> str:
    """A reward_error as a sentence naming the function."""
    if error == TIMEOUT_ERROR:
        within = f" within reward.timeout_s={timeout_s:g} s" if timeout_s is not None else ""
        return f"reward function {fn_label} timed out (no result{within})"
    if error_kind(error) == NON_FINITE:
        return f"reward function {fn_label} {error.split(': ', 1)[-1]}"
    return f"reward function {fn_label} raised {error}"


def error_value(cfg: RewardConfig) -> float:
    """The reward a failed sample carries: reward.error_score with on_error=score, else 0."""
    return cfg.error_score if cfg.on_error == "score" else 0.0


def _resolve(fn: str | RewardFn) -> RewardFn:
    return custom.resolve_reward_function(fn) if isinstance(fn, str) else fn


def _fn_label(fn: str | RewardFn) -> str:
    return custom.label(fn) if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))


def _score(
    batch: Batch, fn: str | RewardFn, error_score: float
) -> tuple[Batch, dict[str, float], dict[str, tuple[str, str, str]]]:
    """score_batch plus the first sample of each error kind: {kind: (error, prompt, response)}."""
    reward_fn = _resolve(fn)
    rewards: list[float] = []
    errors: list[str | None] = []
    examples: dict[str, tuple[str, str, str]] = {}
    for prompt, response, truth in zip(batch["prompt_text"], batch["response_text"], batch["ground_truth"]):
        error = None
        try:
            value = float(reward_fn(prompt, response, truth))
            if not math.isfinite(value):
                error = f"{NON_FINITE}: returned {value}"
        except Exception as err:  # noqa: BLE001 - one bad sample must not stop the run
            error = f"{type(err).__name__}: {err}"
        if error is None:
            rewards.append(value)
        else:
            rewards.append(error_score)
            examples.setdefault(error_kind(error), (error, prompt, response))
        errors.append(error)
    seq_reward = torch.tensor(rewards, dtype=torch.float32)
    out = Batch.from_dict(
        {
            "seq_reward": seq_reward,
            "token_rewards": token_rewards_at_last_token(seq_reward, batch["response_mask"]),
        },
        {"reward_error": errors},
    )
    scored = [r for r, e in zip(rewards, errors) if e is None]
    mean = sum(scored) / len(scored) if scored else 0.0
    return out, {"reward/mean": mean, "reward/num_errors": float(len(errors) - len(scored))}, examples


def score_batch(batch: Batch, fn: str | RewardFn, error_score: float = 0.0) -> tuple[Batch, dict[str, float]]:
    """Reward every sample; returns the new columns (seq_reward, token_rewards, reward_error) and
    metrics reward/mean (over the samples whose reward did not fail), reward/num_errors. `fn` is a
    registered name, a 'pkg.mod:fn' / 'file.py:fn' spec or the function itself; a failed sample
    gets `error_score`."""
    out, metrics, _ = _score(batch, fn, error_score)
    return out, metrics


@ray.remote(num_cpus=TASK_NUM_CPUS, num_returns=2, max_retries=0)
def _score_rows(
    source: DistributedBatch, start: int, stop: int, fn: str | RewardFn, error_score: float
) -> tuple[Batch, dict]:
    out, metrics, examples = _score(source.materialize(start, stop), fn, error_score)
    return out, {"metrics": metrics, "examples": examples}


def _timed_out_rows(source: DistributedBatch, start: int, stop: int, error_score: float) -> Batch:
    # Only the mask is fetched: its width sizes the token rewards.
    mask = source.select("response_mask").materialize(start, stop)["response_mask"]
    seq_reward = torch.full((stop - start,), error_score)
    return Batch.from_dict(
        {"seq_reward": seq_reward, "token_rewards": token_rewards_at_last_token(seq_reward, mask)},
        {"reward_error": [TIMEOUT_ERROR] * (stop - start)},
    )


def log_first_errors(
    fn_label: str,
    examples: dict[str, tuple[str, str, str]],
    timeout_s: float,
    logged: set[tuple[str, str]] | None = None,
) -> None:
    """Log each error kind of `fn_label` the first time it is seen (later ones are only counted).
    `logged` remembers the kinds already logged: a run passes its own set; default: this process's."""
    logged = _LOGGED_KINDS if logged is None else logged
    for kind, (error, prompt, response) in examples.items():
        if (fn_label, kind) in logged:
            continue
        logged.add((fn_label, kind))
        sample = (
            ""
            if kind == TIMEOUT_ERROR
            else f"; sample: prompt={prompt[:EXAMPLE_CHARS]!r} response={response[:EXAMPLE_CHARS]!r}"
        )
        log.warning(
            "%s (first of its kind; later ones are counted in reward/num_errors)%s",
            describe_error(fn_label, error, timeout_s),
            sample,
        )


def reset_logged_errors() -> None:
    """Forget which error kinds were logged (a new run in the same process logs them again)."""
    _LOGGED_KINDS.clear()


def score_with_errors(
    batch: Batch | DistributedBatch,
    cfg: RewardConfig,
    reward_fn: RewardFn | None = None,
    logged: set[tuple[str, str]] | None = None,
) -> tuple[DistributedBatch, dict[str, float], str | None]:
    """`score_in_parallel` plus the first error of this batch as a sentence (None if none failed);
    `logged` as in `log_first_errors`."""
    fn: str | RewardFn = reward_fn if reward_fn is not None else cfg.function
    task_env = None
    if isinstance(fn, str):
        if custom.is_custom_spec(fn):
            custom.resolve_reward_function(fn)  # fail here, with the reason, not inside a task
            task_env = custom.reward_task_runtime_env(fn)
        else:
            # Ship the function itself: one registered in the user's script (__main__) travels by
            # value, so the workers need not have the driver's registry.
            fn = REWARD_FUNCTIONS.get(fn)  # fails here with the list of names
    fn_label = _fn_label(reward_fn if reward_fn is not None else cfg.function)
    fill = error_value(cfg)
    source = batch if isinstance(batch, DistributedBatch) else DistributedBatch.from_batch(batch)
    source = source.select(*INPUT_COLUMNS)
    ranges = source.row_ranges(max(1, min(cfg.num_parallel, len(source))))
    task = _score_rows if task_env is None else _score_rows.options(runtime_env=task_env)
    pending = [task.remote(source, start, stop, fn, fill) for start, stop in ranges]
    info_refs = [info for _, info in pending]

    deadline = time.monotonic() + cfg.timeout_s
    done: set[ray.ObjectRef] = set()
    while len(done) < len(info_refs):
        waiting = [r for r in info_refs if r not in done]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        ray.get(ready)  # a task that failed as a whole (not one sample) is a bug: raise it
        done.update(ready)

    shards: list[tuple[ray.ObjectRef, int]] = []
    total = 0.0
    num_errors = 0.0
    num_timeouts = 0
    examples: dict[str, tuple[str, str, str]] = {}
    for (start, stop), (rows_ref, info_ref) in zip(ranges, pending):
        n = stop - start
        if info_ref in done:
            info = ray.get(info_ref)
            metrics = info["metrics"]
            shards.append((rows_ref, n))
            total += metrics["reward/mean"] * (n - metrics["reward/num_errors"])
            num_errors += metrics["reward/num_errors"]
            for kind, example in info["examples"].items():
                examples.setdefault(kind, example)
        else:
            ray.cancel(info_ref, force=True)
            shards.append((ray.put(_timed_out_rows(source, start, stop, fill)), n))
            num_timeouts += n
            examples.setdefault(TIMEOUT_ERROR, (TIMEOUT_ERROR, "", ""))
    log_first_errors(fn_label, examples, cfg.timeout_s, logged)
    num_rows = len(source)
    failed = num_errors + num_timeouts
    first = next(iter(examples.values()), None)
    first_error = None if first is None else describe_error(fn_label, first[0], cfg.timeout_s)
    scored = num_rows - failed
    return (
        DistributedBatch.from_refs([r for r, _ in shards], [n for _, n in shards]),
        {
            "reward/mean": total / scored if scored else 0.0,
            "reward/num_errors": failed,
            "reward/num_timeouts": float(num_timeouts),
            "reward/error_share": failed / num_rows if num_rows else 0.0,
        },
        first_error,
    )


def score_in_parallel(
    batch: Batch | DistributedBatch,
    cfg: RewardConfig,
    reward_fn: RewardFn | None = None,
) -> tuple[DistributedBatch, dict[str, float]]:
    """Score `batch` in `cfg.num_parallel` Ray tasks over contiguous row ranges.

    The result columns stay in the object store (a DistributedBatch to `union` with the input).
    `reward_fn` replaces `cfg.function` (a function object, pickled into the tasks). Chunks not done
    `cfg.timeout_s` after submission are cancelled and get reward_error "timeout". Metrics:
    reward/mean (over the samples whose reward did not fail), reward/num_errors (timeouts included),
    reward/num_timeouts, reward/error_share (failed / all).
    """
    rewards, metrics, _ = score_with_errors(batch, cfg, reward_fn)
    return rewards, metrics


def check_error_share(
    num_failed: float, num_total: int, first_error: str | None, cfg: RewardConfig, what: str
) -> None:
    """Raise RewardFailureError when more than reward.max_error_share of `num_total` rewards failed."""
    if num_total == 0 or num_failed / num_total <= cfg.max_error_share:
        return
    share = num_failed / num_total
    raise RewardFailureError(
        f"{share:.0%} of this step's {what} rewards failed ({int(num_failed)} of {num_total}), more than "
        f"reward.max_error_share={cfg.max_error_share:g}; first error: {first_error or 'unknown'}. "
        "Fix the reward function (run it on a few of the samples by hand), or raise "
        "reward.max_error_share to train on past failing rewards"
    )
