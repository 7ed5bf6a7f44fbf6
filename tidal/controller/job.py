"""A running job: the worker groups, data, logger and checkpoints a program needs, built from config.

`Job.start(cfg)` prepares the model folder, starts (or joins) Ray, places one worker group per
resource pool with every role assigned to that pool colocated in its processes, and loads data.
Programs only see role handles (`job.actor.update(batch)`) and a few driver-side services.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tidal.algorithms import build_kl_controller
from tidal.checkpoint.manager import CheckpointManager
from tidal.checkpoint.run_dir import check_resumable, config_fingerprint, fingerprinted_config, new_run_id
from tidal.config.schema import JobConfig
from tidal.controller.dispatch import run_task
from tidal.controller.ray_cluster import ensure_ray
from tidal.controller.resource_pool import ResourcePool
from tidal.controller.worker_group import WorkerGroup
from tidal.dataflow.batch import Batch
from tidal.dataflow.dataset import PromptDataset, PromptLoader, build_datasets
from tidal.dataflow.tokenizer import load_tokenizer
from tidal.observability.metrics import MetricsLogger

log = logging.getLogger(__name__)

STREAM_STATE_FILE = "stream.pkl"  # streaming mode: store contents, requests in flight, counters


def _pickle_save(obj: Any, path: Path) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def _pickle_load(path: Path) -> Any:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def role_classes(cfg: JobConfig) -> dict[str, type]:
    """Enabled roles in build order (the rollout after the actor it copies weights from)."""
    from tidal.workers.roles.actor import ActorRole
    from tidal.workers.roles.critic import CriticRole
    from tidal.workers.roles.preference import PairReferenceRole
    from tidal.workers.roles.reference import ReferenceRole
    from tidal.workers.roles.rollout import RolloutRole

    roles: dict[str, type] = {"actor": ActorRole}
    preference = cfg.algorithm.preference is not None
    # Preference training generates nothing; the rollout only serves the greedy held-out accuracy
    # of a built-in task (its prompts have ground truths, pair files do not).
    if not preference or cfg.data.task is not None:
        roles["rollout"] = RolloutRole
    if cfg.reference_enabled:  # a preference job's reference also scores pairs (DPO)
        roles["reference"] = PairReferenceRole if preference else ReferenceRole
    if cfg.critic_enabled:
        roles["critic"] = CriticRole
    return roles


class Job:
    def __init__(self, cfg: JobConfig, run_id: str | None = None):
        self.cfg = cfg
        self.output_dir = Path(cfg.trainer.output_dir)
        self.version = 0
        self.kl_ctrl = build_kl_controller(cfg.algorithm.kl_ctrl)
        # A resume takes over the restored checkpoint's run id (restore_latest_checkpoint).
        self.run_id = run_id or new_run_id()
        self.checkpoints = CheckpointManager(self.output_dir, cfg.checkpoint.keep_last, self.run_id)
        self.groups: dict[str, WorkerGroup] = {}
        self.val_prompts: Batch | None = None  # held-out prompts for the generating eval
        self.val_pairs: Batch | None = None  # held-out preference pairs (preference jobs)
        self._role_pool: dict[str, str] = {}
        self._cluster = None  # the local Ray cluster this job started, if it started one
        # trainer.mode=streaming: the StreamingSource that feeds the loop (streaming/runner.py)
        self.stream: Any = None
        self.stream_resume: dict[str, Any] | None = None  # its checkpointed state, loaded on start

    # ------------------------------------------------------------------ construction
    @classmethod
    def start(cls, cfg: JobConfig, run_id: str | None = None) -> Job:
        """`run_id`: the one `run_dir.prepare_output_dir` recorded (a new one when not given)."""
        from tidal.tasks.prepare import check_reference_model, prepare_model

        job = cls(cfg, run_id)
        model_path = prepare_model(cfg.model, cfg.data)
        if cfg.reference_enabled and cfg.reference.model_path is not None:
            check_reference_model(cfg.reference.model_path, model_path)
        if cfg.algorithm.preference is None:
            train_set, val_set = build_datasets(
                cfg.data, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
            )
            job.train_loader, job.val_prompts, job.dataset_report = _loaders(
                cfg, train_set, val_set, "prompts"
            )
        else:
            job._load_pairs()

        roles = role_classes(cfg)
        by_pool: dict[str, dict[str, type]] = {}
        for name, role_cls in roles.items():
            pool = getattr(cfg, name).pool
            by_pool.setdefault(pool, {})[name] = role_cls
            job._role_pool[name] = pool
        pools = {name: cfg.resources.pools[name] for name in by_pool}
        from tidal.workers.rewards.custom import reward_runtime_env  # ships user reward code to workers

        job._cluster = ensure_ray(
            num_cpus=sum(p.num_workers * p.cpus_per_worker for p in pools.values()) + cfg.reward.num_parallel,
            temp_dir=job.output_dir / "ray",
            runtime_env=reward_runtime_env(cfg),
        )
        for pool_name, pool_roles in by_pool.items():
            pool = ResourcePool(pool_name, pools[pool_name])
            job.groups[pool_name] = WorkerGroup(pool, pool_roles, cfg)
        job.logger = MetricsLogger(job.output_dir, cfg.logging)
        return job

    def _load_pairs(self) -> None:
        """Preference pairs to train and evaluate on, and the task's held-out prompts when there is a task."""
        from tidal.dataflow.pairs import build_pair_datasets

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        train_set, val_set = build_pair_datasets(cfg.data, tokenizer)
        self.train_loader, self.val_pairs, self.dataset_report = _loaders(cfg, train_set, val_set, "pairs")
        self.val_prompts = None
        if cfg.data.task is not None:  # greedy accuracy on the task's held-out problems
            val_prompts = PromptDataset.from_task(cfg.data.task, "val", cfg.data, tokenizer)
            self.val_prompts = _held_out_batch(cfg, val_prompts)

    def restart_group(self, pool_name: str) -> WorkerGroup:
        """Kill every worker of pool `pool_name` and start the pool again from its config (all its
        ranks: they share one torch world). The new workers start from the model's initial weights.
        Refuses a pool hosting a trained role, whose state would be lost."""
        if pool_name not in self.groups:
            raise ValueError(f"no worker group runs on pool {pool_name!r}; the job has {sorted(self.groups)}")
        roles = {
            name: cls for name, cls in role_classes(self.cfg).items() if self._role_pool[name] == pool_name
        }
        trained = [name for name in roles if name in self._trained_roles()]
        if trained:
            raise ValueError(
                f"pool {pool_name!r} hosts the trained role(s) {trained}; restarting it would lose their "
                "state (restore them from a checkpoint instead)"
            )
        self.groups[pool_name].shutdown()
        pool = ResourcePool(pool_name, self.cfg.resources.pools[pool_name])
        self.groups[pool_name] = WorkerGroup(pool, roles, self.cfg)
        return self.groups[pool_name]

    def shutdown(self) -> Path | None:
        for group in self.groups.values():
            group.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
        return self.logger.close()

    # ------------------------------------------------------------------ role handles
    def _role(self, name: str) -> Any:
        return self.group_of(name).role(name)

    def group_of(self, role: str) -> WorkerGroup:
        if role not in self._role_pool:
            raise AttributeError(f"role {role!r} is not enabled in this job")
        return self.groups[self._role_pool[role]]

    @property
    def actor(self) -> Any:
        return self._role("actor")

    @property
    def rollout(self) -> Any:
        return self._role("rollout")

    @property
    def reference(self) -> Any:
        return self._role("reference")

    @property
    def critic(self) -> Any:
        return self._role("critic")

    @property
    def needs_old_log_probs(self) -> bool:
        """On-policy updates (one optimizer step per sample, no KL in the reward, fresh data) skip
        the extra forward: the actor then uses its current log-probs, detached, as the old ones
        (ratio 1)."""
        cfg = self.cfg
        on_policy = cfg.sizes.num_mini_batches == 1 and cfg.actor.epochs == 1
        # Streaming with staleness: the data is off-policy; the trainer's log-probs of it give the
        # mismatch metrics (rollout/mismatch_kl) and the proximal policy of decoupled PPO.
        stale = cfg.trainer.mode == "streaming" and cfg.trainer.max_staleness > 0
        return not on_policy or stale or cfg.algorithm.use_kl_in_reward

    # ------------------------------------------------------------------ driver-side services
    run_task = staticmethod(run_task)

    def kl_ctrl_state(self) -> float:
        return self.kl_ctrl.value

    def update_kl_ctrl(self, current_kl: float, num_samples: int) -> None:
        self.kl_ctrl.update(current_kl, num_samples)

    def sync_weights(self, version: int) -> dict[str, float]:
        """Actor -> rollout through the resharder on the actor's pool; rank 0's `weight_sync/` metrics."""
        if "rollout" not in self._role_pool:  # preference training without a generating eval
            self.version = version
            return {}
        if self.stream is not None:  # streaming: to the rollout pool, through the weight bridge
            metrics = self.stream.sync_weights(version)
            self.version = version
            return metrics
        metrics = self.groups[self._role_pool["actor"]].sync_weights("actor", "rollout", version)
        self.version = version
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _trained_roles(self) -> list[str]:
        return [r for r in ("actor", "critic") if r in self._role_pool]

    def maybe_save_checkpoint(self, step: int) -> None:
        every = self.cfg.checkpoint.save_every
        if step != self.cfg.trainer.total_steps and not (every and step % every == 0):
            return
        path = self.checkpoints.begin(step)
        for role in self._trained_roles():
            self._role(role).save_checkpoint(str(path / role))
        loader_state = self.train_loader.state_dict()
        if self.stream is not None:  # the store, what is in flight, and the rollout's own loader position
            stream_state = self.stream.state_dict()
            loader_state = stream_state["loader"]
            _pickle_save(stream_state, path / STREAM_STATE_FILE)
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

    def restore_latest_checkpoint(self) -> int:
        """Load the newest complete checkpoint when trainer.resume is set; return its step (0 if none).

        Refuses (ValueError) a checkpoint made by a different config; says which one it restored."""
        if not self.cfg.trainer.resume:
            return 0
        latest = self.checkpoints.latest()
        if latest is None:
            log.warning(
                "trainer.resume=true but %s holds no complete checkpoint; starting a fresh run",
                self.checkpoints.root,
            )
            return 0
        step, path = latest
        state = self.checkpoints.trainer_state(path)
        check_resumable(self.cfg, state, path)  # before any role loads anything
        for role in self._trained_roles():
            self._role(role).load_checkpoint(str(path / role))
        self.train_loader.load_state_dict(state["loader"])
        if (path / STREAM_STATE_FILE).exists():
            self.stream_resume = _pickle_load(path / STREAM_STATE_FILE)
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
        return step


def _loaders(
    cfg: JobConfig, train_set: PromptDataset, val_set: PromptDataset | None, kind: str
) -> tuple[PromptLoader, Batch | None, dict[str, int]]:
    """The endless training loader, the fixed held-out batch (trainer.num_eval_prompts rows) and
    the data report (`data/train_<kind>`, `data/train_skipped`, ...)."""
    loader = PromptLoader(train_set, cfg.trainer.prompts_per_step, cfg.data.shuffle, cfg.data.seed)
    report = {f"data/train_{kind}": len(train_set), "data/train_skipped": train_set.num_skipped}
    report |= train_set.skip_report("data/train")  # skips by reason, so metrics say why rows went
    if val_set is None:
        return loader, None, report
    val = _held_out_batch(cfg, val_set)
    report |= {f"data/val_{kind}": len(val), "data/val_skipped": val_set.num_skipped}
    return loader, val, report | val_set.skip_report("data/val")


def _held_out_batch(cfg: JobConfig, val_set: PromptDataset) -> Batch:
    """The first trainer.num_eval_prompts rows of `val_set` (all when 0), in order, as one batch."""
    num_val = min(cfg.trainer.num_eval_prompts or len(val_set), len(val_set))
    return PromptLoader(val_set, num_val, shuffle=False, seed=0).next_batch()
