"""Step metrics: one JSON line per step, TensorBoard scalars, and a PNG of the curves people look at."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tidal.config.schema import LoggingConfig

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends to `<dir>/metrics.jsonl` (so a resumed run continues the same file).

    `begin(first_step)` starts the stream: rows at or after `first_step` are left over from an
    interrupted attempt that the resumed run now redoes, so they are dropped from the JSONL and
    purged from TensorBoard; each step then appears once.
    """

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        self._begun = False

    def begin(self, first_step: int) -> int:
        """Open the outputs, first dropping rows with step >= `first_step`; return how many were dropped."""
        self._begun = True
        dropped = 0
        if self.cfg.jsonl:
            dropped = truncate_jsonl(self.jsonl_path, first_step)
            if dropped:
                log.info(
                    "metrics.jsonl: dropped %d row(s) from step %d on (redone by this run)",
                    dropped,
                    first_step,
                )
            self._jsonl = self.jsonl_path.open("a")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.dir / "tensorboard"
            # purge_step hides the earlier events at or after it from TensorBoard's views.
            purge = first_step if tb_dir.exists() else None
            self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge)
        return dropped

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._begun:  # a caller that never said where it starts starts here
            self.begin(step)
        clean = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key, value in clean.items():
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> Path | None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self.cfg.plot and self.jsonl_path.exists():
            from tidal.observability.plot import plot_metrics

            return plot_metrics(self.jsonl_path, self.dir / "metrics.png")
        return None


def _to_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def truncate_jsonl(path: Path, first_step: int) -> int:
    """Keep only rows with step < `first_step` (atomically: temp file, then os.replace); return rows dropped.

    A torn last line (a kill mid-write) is dropped too, and counted."""
    if not path.is_file():
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            keep = json.loads(line)["step"] < first_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new_text)
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
