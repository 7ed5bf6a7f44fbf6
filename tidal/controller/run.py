"""Entry point for a whole run: start the job, pick the program, always clean up."""

from __future__ import annotations

import logging
from typing import Any

from tidal.checkpoint.run_dir import prepare_output_dir
from tidal.config.schema import JobConfig
from tidal.controller.job import Job
from tidal.controller.loop import run_steps
from tidal.controller.preflight import preflight
from tidal.controller.programs.grpo import grpo_step
from tidal.controller.programs.ppo import ppo_step
from tidal.controller.programs.preference import run_preference
from tidal.controller.streaming.runner import run_streaming


def train(cfg: JobConfig) -> dict[str, Any]:
    """Train to trainer.total_steps; return the final metrics, the data report and the plot path.

    Raises ConfigError before any process starts when the pre-flight checks fail (paths, tokenizer,
    machine) or trainer.output_dir holds a run this config may not start over or resume (see
    tidal/controller/preflight.py and tidal/checkpoint/run_dir.py)."""
    preflight(cfg)
    run_id = prepare_output_dir(cfg)
    _show_info_logs()
    job = Job.start(cfg, run_id)
    try:
        if cfg.algorithm.preference is not None:
            final = run_preference(job)  # offline pairs: DPO, SimPO, REDI
        else:
            step = ppo_step if cfg.critic_enabled else grpo_step
            # The same program in both modes; streaming only changes where batches come from.
            runner = run_streaming if cfg.trainer.mode == "streaming" else run_steps
            final = runner(job, step)
    finally:
        plot = job.shutdown()
    return {
        "final": final,
        "data": job.data.report,
        "plot": str(plot) if plot else None,
        "output_dir": str(job.output_dir),
    }


def _show_info_logs() -> None:
    """Print Tidal's info lines (e.g. "resumed from ...") when the application configured no logging."""
    tidal_log = logging.getLogger("tidal")
    if logging.getLogger().handlers or tidal_log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("tidal: %(message)s"))
    tidal_log.addHandler(handler)
    tidal_log.setLevel(logging.INFO)
