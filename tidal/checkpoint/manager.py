"""Checkpoint folders: `<output_dir>/checkpoints/step_00000012/{<role>/..., trainer_state.json, COMPLETE}`.

A folder counts only once COMPLETE is written (last), so a run killed mid-save resumes from the
previous one. Roles write their own state (model, optimizer, scheduler, RNG) into their subfolder;
the driver's state (step, data position, KL controller, run id, config fingerprint) goes into
trainer_state.json. Pruning (keep_last) deletes only checkpoints of this manager's run id, never the
one just written: an output dir may still hold another run's checkpoints (see run_dir.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 1, run_id: str | None = None):
        """Without a run id the manager only reads: it can tell no checkpoint as its own to prune."""
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.run_id = run_id

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name[5:])
            for p in self.root.glob("step_*")
            if p.name[5:].isdigit() and (p / MARKER).exists()
        )

    def latest(self) -> tuple[int, Path] | None:
        steps = self.complete_steps()
        return (steps[-1], self.path_for(steps[-1])) if steps else None

    def begin(self, step: int) -> Path:
        path = self.path_for(step)
        if path.exists():  # an earlier, incomplete attempt at this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def finish(self, step: int, trainer_state: dict[str, Any]) -> None:
        path = self.path_for(step)
        state = {**trainer_state, "run_id": self.run_id}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (path / MARKER).write_text("")
        self.prune(keep=step)

    def prune(self, keep: int) -> list[int]:
        """Delete this run's oldest checkpoints beyond keep_last, never step `keep`; return the steps deleted."""
        if self.run_id is None:
            return []
        ours = [s for s in self.complete_steps() if s != keep and self.run_id_of(s) == self.run_id]
        doomed = ours[: max(len(ours) - (self.keep_last - 1), 0)]
        for old in doomed:
            shutil.rmtree(self.path_for(old), ignore_errors=True)
        return doomed

    def run_id_of(self, step: int) -> str | None:
        try:
            return self.trainer_state(self.path_for(step)).get("run_id")
        except (OSError, ValueError):  # unreadable: not provably ours, so never pruned
            return None

    @staticmethod
    def trainer_state(path: Path) -> dict[str, Any]:
        return json.loads((path / "trainer_state.json").read_text())
