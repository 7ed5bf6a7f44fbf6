"""TrainerState: what training carries from one step to the next, and its checkpoints.

The policy version (the step whose update made the weights), the KL-in-reward controller, the run
id; `save` writes the trained roles, the data position and (streaming) the stream's state as one
checkpoint, `restore` loads the newest one after checking it was made by this config.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from tidal.algorithms import build_kl_controller
from tidal.checkpoint.manager import CheckpointManager
from tidal.checkpoint.run_dir import check_resumable, config_fingerprint, fingerprinted_config, new_run_id
from tidal.config.schema import JobConfig

log = logging.getLogger(__name__)

STREAM_STATE_FILE = "stream.pkl"  # streaming mode: store contents, requests in flight, counters


class TrainerState:
    def __init__(self, cfg: JobConfig, run_id: str | None = None):
        self.cfg = cfg
        self.version = 0  # the weights the rollout serves were made by this step's update
        self.kl_ctrl = build_kl_controller(cfg.algorithm.kl_ctrl)
        # A resume takes over the restored checkpoint's run id (`restore`).
        self.run_id = run_id or new_run_id()
        self.checkpoints = CheckpointManager(Path(cfg.trainer.output_dir), cfg.checkpoint.keep_last, self.run_id)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.save_every
        return step == self.cfg.trainer.total_steps or bool(every and step % every == 0)

    def save(self, step: int, roles: dict[str, Any], loader_state: dict, stream_state: dict | None) -> None:
        """One checkpoint: `roles` (name -> handle) save themselves; the stream's state, when
        streaming, carries the rollout's own loader position, which is then the one to resume."""
        path = self.checkpoints.begin(step)
        for name, role in roles.items():
            role.save_checkpoint(str(path / name))
        if stream_state is not None:
            loader_state = stream_state["loader"]
            with open(path / STREAM_STATE_FILE, "wb") as f:
                pickle.dump(stream_state, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.checkpoints.finish(
            step,
            {
                "step": step,
                "loader": loader_state,
                "kl_coef": self.kl_ctrl.value,
                # What resume checks the config against (run_dir.check_resumable).
                "fingerprint": config_fingerprint(self.cfg),
                "config": fingerprinted_config(self.cfg),
            },
        )

    def restore(self, roles: dict[str, Any]) -> tuple[int, dict | None, dict | None]:
        """Load the newest complete checkpoint when trainer.resume is set: (its step, the loader
        state, the stream state), or (0, None, None) when there is none to resume.

        Refuses (ValueError) a checkpoint made by a different config; says which one it restored."""
        if not self.cfg.trainer.resume:
            return 0, None, None
        latest = self.checkpoints.latest()
        if latest is None:
            log.warning(
                "trainer.resume=true but %s holds no complete checkpoint; starting a fresh run",
                self.checkpoints.root,
            )
            return 0, None, None
        step, path = latest
        state = self.checkpoints.trainer_state(path)
        check_resumable(self.cfg, state, path)  # before any role loads anything
        for name, role in roles.items():
            role.load_checkpoint(str(path / name))
        stream_state = None
        if (path / STREAM_STATE_FILE).exists():
            with open(path / STREAM_STATE_FILE, "rb") as f:
                stream_state = pickle.load(f)
        self.kl_ctrl.value = state["kl_coef"]
        self.run_id = self.checkpoints.run_id = state["run_id"]  # the same run goes on
        log.info("resumed from %s (step %d)", path, step)
        total = self.cfg.trainer.total_steps
        if step >= total:
            log.warning(
                "already at step %d of %d; nothing to train (raise trainer.total_steps to continue)",
                step,
                total,
            )
        return step, state["loader"], stream_state
