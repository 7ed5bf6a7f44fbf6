"""Checkpoint folders: `<output_dir>/checkpoints/step_00000012/{<role>/..., trainer_state.json, COMPLETE}`.

A folder counts only once COMPLETE is written (last), so a run killed mid-save resumes from the
previous one. Roles write their own state (model, optimizer, scheduler, RNG) into their subfolder;
the driver's state (step, data position, KL controller) goes into trainer_state.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("step_*") if (p / MARKER).exists())

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
        (path / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (path / MARKER).write_text("")
        for old in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.path_for(old), ignore_errors=True)

    @staticmethod
    def trainer_state(path: Path) -> dict[str, Any]:
        return json.loads((path / "trainer_state.json").read_text())
