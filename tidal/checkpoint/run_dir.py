"""One run per output directory: refuse to mix runs, overwrite only when asked, resume only the same config.

Files a run owns in `trainer.output_dir` (RUN_FILES): `checkpoints/`, `metrics.jsonl`, `tensorboard/`,
`metrics.png` and `run.json` (its run id and config fingerprint). Anything else there (Ray's `ray`
temp dir or symlink, the user's own files) is never touched.

- A fresh run (trainer.resume=false) in a dir that holds an earlier run (a complete checkpoint or a
  non-empty metrics.jsonl) is refused, unless trainer.overwrite=true, which deletes the earlier
  run's RUN_FILES first. resume and overwrite together are refused: they contradict each other.
- trainer.resume=true restores the newest complete checkpoint, and only if it was made by the same
  config: every checkpoint records a fingerprint (sha256 of the config dump without FREE_ON_RESUME)
  and that dump, so a refusal names the dotted keys that differ. With no checkpoint the run starts
  fresh (with a warning).
- Keys that may change on resume (FREE_ON_RESUME): trainer.total_steps (raising it continues a run;
  a decaying LR schedule is then stretched to the new length from the resume point on),
  trainer.resume, trainer.overwrite, trainer.eval_every, trainer.num_eval_prompts (evaluation only),
  trainer.output_dir (a run dir may be moved or copied), and the whole `logging` and `checkpoint`
  sections (what is recorded and how often, not what is trained).
- Every checkpoint records its run id; pruning (checkpoint.keep_last) deletes only checkpoints of
  the current run. A resumed run keeps the run id of the checkpoint it restored.

`check_output_dir` is pure (reads only) so it can run before any process starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from tidal.checkpoint.manager import CheckpointManager
from tidal.config.schema import JobConfig
from tidal.config.yaml_source import cut

RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "metrics.png", "run.json")
FREE_ON_RESUME = (
    "trainer.total_steps",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.eval_every",
    "trainer.num_eval_prompts",
    "trainer.output_dir",
    "logging",
    "checkpoint",
)
MAX_VALUE_CHARS = 60  # values in a mismatch message are cut to this
MAX_LISTED_KEYS = 12


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def fingerprinted_config(cfg: JobConfig) -> dict[str, Any]:
    """The config dump the fingerprint covers: everything but FREE_ON_RESUME."""
    dump = cfg.model_dump(mode="json")
    for dotted in FREE_ON_RESUME:
        *parents, leaf = dotted.split(".")
        node = dump
        for key in parents:
            node = node[key]
        node.pop(leaf, None)
    return dump


def config_fingerprint(cfg: JobConfig) -> str:
    return _hash(fingerprinted_config(cfg))


def _hash(dump: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(cfg: JobConfig, state: dict[str, Any], path: Path) -> None:
    """Raise ValueError unless the checkpoint at `path` (its trainer_state) was made by this config."""
    fix = (
        "resume with the config that made it, or start a fresh run with trainer.overwrite=true "
        "or another trainer.output_dir"
    )
    if "fingerprint" not in state or "config" not in state:
        raise ValueError(
            f"trainer.resume=true but checkpoint {path} records no config fingerprint (made by an older "
            f"Tidal), so it cannot be checked against this config; {fix}"
        )
    if state["fingerprint"] == config_fingerprint(cfg):
        return
    diffs = config_diff(state["config"], fingerprinted_config(cfg))
    listed = "; ".join(diffs[:MAX_LISTED_KEYS])
    more = f"; and {len(diffs) - MAX_LISTED_KEYS} more" if len(diffs) > MAX_LISTED_KEYS else ""
    raise ValueError(
        f"trainer.resume=true but checkpoint {path} was made by a different config: {listed}{more}; {fix}"
    )


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: checkpoint X, now Y' for each dotted key whose value differs (absent on one side included)."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    out = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            show = lambda v: "(absent)" if v is missing else cut(json.dumps(v), MAX_VALUE_CHARS)  # noqa: E731
            out.append(f"{key}: checkpoint {show(old)}, now {show(new)}")
    return out


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else key)
    return flat


def earlier_run(output_dir: str | Path) -> list[str]:
    """What in `output_dir` shows an earlier run (empty if none): its complete checkpoints, its metrics."""
    out = Path(output_dir)
    found = []
    steps = CheckpointManager(out).complete_steps()
    if steps:
        shown = ", ".join(str(s) for s in steps[-3:])
        more = "..., " if len(steps) > 3 else ""
        found.append(f"{len(steps)} checkpoint(s) in checkpoints/ (steps {more}{shown})")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        if rows:
            found.append(f"metrics.jsonl with {rows} row(s)")
    return found


def check_output_dir(cfg: JobConfig) -> None:
    """Raise ValueError if this run may not start in trainer.output_dir as configured. Reads only."""
    trainer = cfg.trainer
    if trainer.resume and trainer.overwrite:
        raise ValueError(
            "trainer.resume=true and trainer.overwrite=true contradict each other (continue the run in "
            f"trainer.output_dir={trainer.output_dir} or delete it); pick one"
        )
    if trainer.resume:
        latest = CheckpointManager(trainer.output_dir).latest()
        if latest is not None:
            step, path = latest
            check_resumable(cfg, CheckpointManager.trainer_state(path), path)
        return
    found = earlier_run(trainer.output_dir)
    if found and not trainer.overwrite:
        raise ValueError(
            f"trainer.output_dir={trainer.output_dir} holds an earlier run ({'; '.join(found)}); set "
            "trainer.resume=true to continue it, trainer.overwrite=true to delete it and start over, "
            "or choose another trainer.output_dir"
        )


def prepare_output_dir(cfg: JobConfig) -> str:
    """Delete the earlier run when trainer.overwrite is set, record this run in run.json; return its run id.

    Call after `check_output_dir`. A resumed run keeps the run id of the checkpoint it will restore.
    """
    out = Path(cfg.trainer.output_dir)
    if cfg.trainer.overwrite and not cfg.trainer.resume:
        for name in RUN_FILES:
            _remove(out / name)
    run_id = None
    if cfg.trainer.resume:
        latest = CheckpointManager(out).latest()
        if latest is not None:
            run_id = CheckpointManager.trainer_state(latest[1]).get("run_id")
    run_id = run_id or new_run_id()
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": run_id,
        "fingerprint": config_fingerprint(cfg),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resume": cfg.trainer.resume,
    }
    (out / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return run_id


def _remove(path: Path) -> None:
    # A symlink is removed itself, never followed: its target is not ours to delete.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
