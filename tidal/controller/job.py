"""A running job: the parts a program needs, each with one job, built from config.

    job.cluster      Ray, the worker groups, role handles              (cluster.py)
    job.data         the training loader, held-out batches, data report (data_source.py)
    job.state        policy version, KL controller, run id, checkpoints (trainer_state.py)
    job.logger       metrics to JSONL / TensorBoard / plot              (observability/metrics.py)
    job.stages       every stage, built from the parts above            (stages/pipeline.py)
    job.sampler      where scored samples come from: generated in place, or (streaming) the store
    job.weight_sync  how the actor's weights reach the rollout          (weight_sync.py)

`Job.start(cfg)` prepares the model folder, loads the data, starts (or joins) Ray and places one
worker group per resource pool. The runner (loop.py / streaming/runner.py) drives the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidal.config.schema import JobConfig
from tidal.controller.cluster import Cluster
from tidal.controller.data_source import DataSource
from tidal.controller.stages.experience import InPlaceSampler, Sampler
from tidal.controller.stages.pipeline import Stages
from tidal.controller.trainer_state import TrainerState
from tidal.controller.weight_sync import WeightSync, for_job
from tidal.observability.metrics import MetricsLogger


class Job:
    def __init__(self, cfg: JobConfig, cluster: Cluster, data: DataSource, state: TrainerState):
        self.cfg = cfg
        self.output_dir = Path(cfg.trainer.output_dir)
        self.cluster, self.data, self.state = cluster, data, state
        self.logger = MetricsLogger(self.output_dir, cfg.logging)
        self.stages = Stages.build(cfg, cluster, state.kl_ctrl, data.val_prompts)
        self.sampler: Sampler = InPlaceSampler(cfg, self.stages, data.train_loader, state)
        self.weight_sync: WeightSync = for_job(cluster, cfg)
        # trainer.mode=streaming: the StreamingSource (streaming/runner.py), and its checkpointed
        # state until it takes it over
        self.stream: Any = None
        self.stream_resume: dict[str, Any] | None = None

    @classmethod
    def start(cls, cfg: JobConfig, run_id: str | None = None) -> Job:
        """`run_id`: the one `run_dir.prepare_output_dir` recorded (a new one when not given)."""
        from tidal.tasks.prepare import check_reference_model, prepare_model

        model_path = prepare_model(cfg.model, cfg.data)
        if cfg.reference_enabled and cfg.reference.model_path is not None:
            check_reference_model(cfg.reference.model_path, model_path)
        data = DataSource.load(cfg)
        cluster = Cluster.start(cfg, temp_dir=Path(cfg.trainer.output_dir) / "ray")
        return cls(cfg, cluster, data, TrainerState(cfg, run_id))

    def shutdown(self) -> Path | None:
        close = getattr(self.weight_sync, "close", None)
        if close is not None:
            close()
        self.cluster.shutdown()
        return self.logger.close()

    # ------------------------------------------------------------------ checkpoints
    def _trained(self) -> dict[str, Any]:
        return {name: self.cluster.role(name) for name in self.cluster.trained_roles()}

    def maybe_save_checkpoint(self, step: int) -> None:
        if self.state.due(step):
            stream_state = self.stream.state_dict() if self.stream is not None else None
            self.state.save(step, self._trained(), self.data.train_loader.state_dict(), stream_state)

    def restore_latest_checkpoint(self) -> int:
        """Load the newest complete checkpoint when trainer.resume is set; return its step (0 if none)."""
        step, loader_state, stream_state = self.state.restore(self._trained())
        if loader_state is not None:
            self.data.train_loader.load_state_dict(loader_state)
        self.stream_resume = stream_state
        return step
