"""The Tidal side: a JobConfig built in code for the workload, and one timed step at a time.

A step here is what `run_steps` does per step minus logging, eval and checkpoints:
`grpo_step(job, step)` (generate, score, old log-probs, advantages, one actor update) followed by
the actor -> rollout weight sync, so that the next step samples from the updated policy as TRL's
does. Both parts are timed separately; the headline s/step is their sum.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _workload import MODEL_BUILD, TASK, Workload

from tidal.config.schema import JobConfig


def config_tree(
    workload: Workload, model_dir: Path, output_dir: Path, streaming: bool = False
) -> dict[str, Any]:
    """Sync: one worker with `num_threads` CPUs. Streaming: the same CPUs split between an actor pool
    and a rollout pool (1 + 1 for the default 2), trainer.max_staleness 1, free schedule."""
    tree = {
        "model": {"path": str(model_dir), "build": MODEL_BUILD.model_dump(), "dtype": "float32"},
        "data": {"task": TASK.model_dump(), "shuffle": False, "seed": workload.seed},
        "resources": {
            "pools": {"default": {"num_workers": 1, "cpus_per_worker": workload.num_threads}},
            "device": "cpu",
        },
        "algorithm": {"advantage_estimator": "grpo"},
        "actor": {
            "optim": {
                "lr": workload.lr,
                "weight_decay": workload.weight_decay,
                "grad_clip": workload.grad_clip,
                "schedule": "constant",
                "warmup_steps": 0,
            },
            "clip_ratio_low": workload.clip_ratio,
            "clip_ratio_high": workload.clip_ratio,
            "loss_agg_mode": "token-mean",
            # One forward/backward over the whole step, as TRL with per_device_train_batch_size=64.
            "micro_batch_size_per_rank": workload.samples_per_step,
            "use_kl_loss": False,
        },
        "reference": {"enable": False},
        "rollout": {
            "sampling": {
                "n": workload.samples_per_prompt,
                "temperature": workload.temperature,
                "top_p": 1.0,
                "top_k": -1,
                "max_new_tokens": workload.max_new_tokens,
            },
        },
        "reward": {"function": "arithmetic"},
        "trainer": {
            "total_steps": workload.total_steps,
            "prompts_per_step": workload.prompts_per_step,
            "seed": workload.seed,
            "output_dir": str(output_dir),
        },
        "logging": {"tensorboard": False, "progress_bar": False, "plot": False, "jsonl": False},
    }
    if streaming:
        if workload.num_threads < 2:
            raise ValueError(
                f"streaming needs at least 2 CPUs (one per pool), the workload has {workload.num_threads}"
            )
        half = workload.num_threads // 2
        tree["resources"]["pools"] = {
            "default": {"num_workers": 1, "cpus_per_worker": workload.num_threads - half},
            "rollout": {"num_workers": 1, "cpus_per_worker": half},
        }
        tree["rollout"]["pool"] = "rollout"
        tree["trainer"] |= {"mode": "streaming", "max_staleness": 1, "streaming": {"schedule": "free"}}
    return tree


def tidal_config(
    workload: Workload, model_dir: Path, output_dir: Path, *, check_registries: bool, streaming: bool = False
) -> JobConfig:
    """Validated JobConfig; `check_registries` also checks registry names (needs the torch side)."""
    tree = config_tree(workload, model_dir, output_dir, streaming)
    if check_registries:
        from tidal.config import config_from_dict

        return config_from_dict(tree)
    return JobConfig.model_validate(tree)


@dataclass
class TidalTimings:
    step_s: list[float] = field(default_factory=list)  # grpo_step + sync
    grpo_step_s: list[float] = field(default_factory=list)
    sync_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)
    gen_tokens_per_s: list[float] = field(default_factory=list)
    response_length: list[float] = field(default_factory=list)
    update_s: list[float] = field(default_factory=list)
    experience_s: list[float] = field(default_factory=list)  # generate + score + old log-probs + advantages
    prompts: list[list[str]] = field(default_factory=list)  # the prompt texts each step drew
    startup_s: float = 0.0


class TidalRunner:
    """Starts the job, syncs weights once, then runs one timed step per `step()` call.

    In streaming mode (trainer.mode=streaming) it first attaches what `run_streaming` attaches (the
    store, the weight bridge, the StreamingSource): `grpo_step` then takes its batches from the
    store, the version-0 sync starts the rollout thread, and the rollout pool keeps generating
    between steps (also while the other side of an interleaved comparison runs).
    """

    def __init__(self, cfg: JobConfig):
        from tidal.controller.job import Job
        from tidal.controller.loop import push_weights
        from tidal.controller.streaming.runner import attached_stream

        self.timings = TidalTimings()
        self.job = None
        self._stream = contextlib.ExitStack()  # the streaming parts, while attached
        start = time.perf_counter()
        try:
            self.job = Job.start(cfg)
            if cfg.trainer.mode == "streaming":  # what run_streaming attaches, without its loop
                self._stream.enter_context(attached_stream(self.job))
            push_weights(self.job, 0)
        except BaseException:
            self.shutdown()
            raise
        self.timings.startup_s = time.perf_counter() - start
        self._record_prompts()

    def _record_prompts(self) -> None:
        """Keep the prompt texts each step draws, to check both sides trained on the same prompts.

        Wraps the loader instance's `next_batch`; the batch itself is passed on untouched.
        """
        loader = self.job.data.train_loader
        original = loader.next_batch

        def recording_next_batch():
            batch = original()
            self.timings.prompts.append([str(text) for text in batch["prompt_text"]])
            return batch

        loader.next_batch = recording_next_batch

    def step(self, index: int) -> None:
        """Run step `index + 1` (steps count from 1, version 0 is the initial policy)."""
        from tidal.controller.loop import push_weights
        from tidal.controller.programs.grpo import grpo_step

        step = index + 1
        start = time.perf_counter()
        metrics = grpo_step(self.job, step)
        mid = time.perf_counter()
        push_weights(self.job, step)
        end = time.perf_counter()
        t = self.timings
        t.grpo_step_s.append(mid - start)
        t.sync_s.append(end - mid)
        t.step_s.append(end - start)
        t.gen_s.append(metrics["perf/gen_s"])
        # Streaming: generation overlaps the step and perf/gen_s is the rollout's busy time since the
        # previous step (0 when its stats had not arrived yet), so take the rollout's own token rate.
        streaming = self.job.stream is not None
        t.gen_tokens_per_s.append(
            metrics["streaming/rollout_tokens_per_s" if streaming else "perf/gen_tokens_per_s"]
        )
        t.response_length.append(metrics["response/length_mean"])
        t.update_s.append(metrics["perf/update_s"])
        t.experience_s.append(metrics["perf/experience_s"])

    def shutdown(self) -> None:
        import ray

        self._stream.close()
        if self.job is not None:
            self.job.shutdown()
        # Job.start started a local Ray cluster in this process; stop it (ours, so not `ray stop`).
        if ray.is_initialized():
            ray.shutdown()
