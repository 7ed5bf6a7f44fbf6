"""Pruning deletes only the current run's old checkpoints (no Ray)."""

from __future__ import annotations

from tidal.checkpoint.manager import CheckpointManager


def save(manager: CheckpointManager, step: int) -> None:
    manager.begin(step)
    manager.finish(step, {"step": step})


def test_prune_keeps_the_last_of_this_run(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, run_id="new")
    for step in (10, 20, 30):
        save(manager, step)
    assert manager.complete_steps() == [20, 30]
    assert manager.trainer_state(manager.path_for(30))["run_id"] == "new"


def test_prune_never_touches_another_runs_checkpoints_nor_the_one_just_written(tmp_path):
    old = CheckpointManager(tmp_path, keep_last=2, run_id="old")
    for step in (140, 150):
        save(old, step)
    new = CheckpointManager(tmp_path, keep_last=1, run_id="new")
    save(new, 10)
    save(new, 20)  # the old run's higher steps must not push the new ones out
    assert new.complete_steps() == [20, 140, 150]


def test_a_checkpoint_without_its_marker_does_not_count(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, run_id="r")
    save(manager, 2)
    manager.begin(4)  # killed mid-save
    (manager.root / "step_notes").mkdir()
    assert manager.latest() == (2, manager.path_for(2))


def test_a_manager_without_run_id_prunes_nothing(tmp_path):
    save(CheckpointManager(tmp_path, keep_last=5, run_id="r"), 1)
    reader = CheckpointManager(tmp_path, keep_last=1)
    assert reader.prune(keep=99) == [] and reader.complete_steps() == [1]
