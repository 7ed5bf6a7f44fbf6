"""One training run of the async-vs-sync benchmark, in its own process; and what its metrics say.

`python benchmarks/_async_run.py SPEC.json` trains one variant (sync, or streaming with a staleness
bound and schedule) with `tidal.controller.run.train` and exits; its own Ray cluster lives and dies
with the process, so runs cannot disturb each other. The parent reads `metrics.jsonl` through
`summarise`.

The timed wall of a run is the sum of `perf/step_s` (sample or generate + reward + old log-probs +
update + weight sync) over the steps after the first `warmup_steps`: steady-state throughput at
equal trained samples. Left out: model loading, Ray start, evaluations, and the warm-up steps,
which carry one-off costs that are not what the comparison is about (the engine's first calls, and
Ray starting worker processes for the reward tasks: ~10 s on the 2-core box). In streaming mode the
rollout runs ahead of the trainer by up to max_staleness + 1 batches both when the window opens
and when it closes, so the window counts the steady state; the run-ahead at its end (generated,
never trained) is not credited.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

VARIANTS = {
    # name: (mode, max_staleness, schedule)
    "sync": ("sync", 0, "free"),
    "free_s1": ("streaming", 1, "free"),
    "free_s2": ("streaming", 2, "free"),
    "deterministic_s1": ("streaming", 1, "deterministic"),
}


def config_tree(spec: dict[str, Any]) -> dict[str, Any]:
    """The JobConfig tree of one run; everything but the variant's mode and pools is shared."""
    mode, staleness, schedule = VARIANTS[spec["variant"]]
    if mode == "sync":  # one worker with both CPUs: the same total as streaming's 1 + 1
        pools = {"default": {"num_workers": 1, "cpus_per_worker": 2}}
        rollout_pool = "default"
    else:
        pools = {
            "default": {"num_workers": 1, "cpus_per_worker": 1},
            "rollout": {"num_workers": 1, "cpus_per_worker": 1},
        }
        rollout_pool = "rollout"
    tree = {
        "model": {"path": spec["model_dir"], "dtype": "float32"},
        "data": {
            "train_files": [spec["train_file"]],
            "val_files": [spec["val_file"]],
            "shuffle": True,
            "seed": spec["seed"],
        },
        "resources": {"pools": pools, "device": "cpu"},
        "algorithm": {"advantage_estimator": "grpo", **spec.get("algorithm_settings", {})},
        "actor": {
            "optim": {"lr": spec["lr"], "warmup_steps": 2, "schedule": "constant", "grad_clip": 1.0},
            "micro_batch_size_per_rank": spec["prompts_per_step"] * spec["n"],
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
        },
        "rollout": {
            "pool": rollout_pool,
            "sampling": {"n": spec["n"], "temperature": 1.0, "max_new_tokens": spec["max_new_tokens"]},
        },
        # 30 s (the default) is too short on the busy 2-core box: the first reward tasks wait for
        # Ray to start their worker processes while the rollout and trainer hold both cores.
        "reward": {"function": "arithmetic", "timeout_s": 300.0},
        "trainer": {
            "mode": mode,
            "total_steps": spec["steps"],
            "prompts_per_step": spec["prompts_per_step"],
            "seed": spec["seed"],
            "eval_every": 0,
            "num_eval_prompts": spec["num_eval_prompts"],
            "output_dir": spec["output_dir"],
            "overwrite": True,
        },
        "logging": {"tensorboard": False, "progress_bar": False, "plot": False},
    }
    if mode == "streaming":  # sync mode refuses streaming settings it would not read
        settings = {"schedule": schedule, **spec.get("streaming_settings", {})}
        tree["trainer"] |= {"max_staleness": staleness, "streaming": settings}
    return tree


def summarise(metrics_path: Path, samples_per_step: int, warmup_steps: int) -> dict[str, Any]:
    """Timed wall, busy/idle shares and outcomes of one run, from its metrics.jsonl rows."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    first = next(r for r in rows if r["step"] == 0)
    trained = [r for r in rows if r["step"] > 0 and "perf/step_s" in r]
    steps = trained[warmup_steps:]
    if not steps:
        raise ValueError(f"{metrics_path}: {len(trained)} steps, none after the {warmup_steps} warm-up steps")
    step_s = [r["perf/step_s"] for r in steps]
    wall = sum(step_s)
    last = trained[-1]
    gen_s = sum(r["perf/gen_s"] for r in steps)
    tokens = sum(r["response/length_mean"] * samples_per_step for r in steps)
    out = {
        "wall_s": wall,
        "warmup_s": sum(r["perf/step_s"] for r in trained[:warmup_steps]),
        "eval0_s": first["perf/eval_s"],
        "step_s": [round(s, 3) for s in step_s],
        "gen_s": gen_s,
        "update_s": sum(r["perf/update_s"] for r in steps),
        "sync_weights_s": sum(r["perf/sync_weights_s"] for r in steps),
        "trained_tokens": tokens,
        "trained_tokens_per_s": tokens / wall,
        "response_length_mean": tokens / (samples_per_step * len(steps)),
        "response_length_max": max(r["response/length_max"] for r in steps),
        # The rollout generates training samples for gen_s of the timed wall (sync: the driver's
        # clock around generate; streaming: the rollout worker's own busy time).
        "rollout_idle_ratio": 1.0 - gen_s / wall,
        "reward_train_last": last["reward/mean"],
        "reward_train_mean": sum(r["reward/mean"] for r in trained) / len(trained),
        "val_reward_initial": first["val/reward"],
        "val_reward_final": last["val/reward"],
        "val_reward_errors": first["val/reward_errors"] + last["val/reward_errors"],
        "num_steps": len(steps),
    }
    if "streaming/train_wait_s" in last:
        waits = sum(r["streaming/train_wait_s"] for r in steps)
        out |= {
            "train_wait_s": waits,
            # The trainer idles while it waits for scored samples in the store.
            "train_idle_ratio": waits / wall,
            "staleness_mean": sum(r["streaming/staleness_mean"] for r in steps) / len(steps),
            "stale_dropped": last["streaming/stale_dropped"],  # over the whole run
            "reward_busy_s": last["streaming/reward_busy_s"],
        }
    else:
        # Sync: the trainer idles while the step generates (and scores, not counted: a lower bound).
        out |= {
            "train_wait_s": gen_s,
            "train_idle_ratio": gen_s / wall,
            "staleness_mean": 0.0,
            "stale_dropped": 0,
        }
    return out


def main(spec_path: str) -> None:
    from tidal.config import config_from_dict
    from tidal.controller.run import train

    spec = json.loads(Path(spec_path).read_text())
    result = train(config_from_dict(config_tree(spec)))
    print(json.dumps({"final_step": result["final"].get("step"), "output_dir": result["output_dir"]}))


if __name__ == "__main__":
    main(sys.argv[1])
