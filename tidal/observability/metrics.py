"""Step metrics: one JSON line per step, TensorBoard scalars, and a PNG of the curves people look at."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tidal.config.schema import LoggingConfig


class MetricsLogger:
    """Appends to `<dir>/metrics.jsonl` (so a resumed run continues the same file)."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a") if cfg.jsonl else None
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
