"""Entry point for a whole run: start the job, pick the program, always clean up."""

from __future__ import annotations

from typing import Any

from tidal.config.schema import JobConfig
from tidal.controller.job import Job
from tidal.controller.programs.grpo import run_grpo
from tidal.controller.programs.ppo import run_ppo
from tidal.controller.programs.preference import run_preference


def train(cfg: JobConfig) -> dict[str, Any]:
    """Train to trainer.total_steps; return the final metrics, the data report and the plot path."""
    job = Job.start(cfg)
    try:
        if cfg.algorithm.preference is not None:
            program = run_preference  # offline pairs: DPO, SimPO, REDI
        else:
            program = run_ppo if cfg.critic_enabled else run_grpo
        final = program(job)
    finally:
        plot = job.shutdown()
    return {
        "final": final,
        "data": job.dataset_report,
        "plot": str(plot) if plot else None,
        "output_dir": str(job.output_dir),
    }
