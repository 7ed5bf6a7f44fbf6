"""Every stage's declared columns hold on a real job: each stage adds all it says it always writes
and nothing it does not declare, and works from only the columns it declares it reads (stages
ship their roles / tasks `stage.inputs(batch)`, so a missing read fails here). PPO with a critic,
a reference (KL loss) and an off-policy correction, so that every experience stage runs."""

from __future__ import annotations

import inspect

import pytest
from tiny_job import ONE_WORKER, QUIET, tiny_model

from tidal.config import load_config
from tidal.controller.job import Job
from tidal.controller.loop import push_weights
from tidal.controller.stages.base import Stage

pytestmark = pytest.mark.ray


def columns(batch) -> set[str]:
    return set(batch.fetch().keys())


def check_declared(stage: Stage, before: set[str], after: set[str]) -> None:
    added = after - before
    assert set(stage.writes) <= added, f"{stage!r} did not write {set(stage.writes) - added}"
    undeclared = added - set(stage.writes) - set(stage.optional_writes)
    assert not undeclared, f"{stage!r} wrote undeclared columns {undeclared}"


def test_stages_write_what_they_declare_and_read_only_that(tmp_path):
    cfg = load_config(
        None,
        [
            *tiny_model(tmp_path / "model"),
            "data.task.type=arithmetic",
            "data.task.max_digits=1",
            "data.task.num_val=4",
            *ONE_WORKER,
            *QUIET,
            "rollout.sampling.n=2",
            "rollout.sampling.max_new_tokens=4",
            "trainer.prompts_per_step=2",
            f"trainer.output_dir={tmp_path / 'run'}",
            "algorithm.advantage_estimator=gae",
            "actor.use_kl_loss=true",
            "algorithm.off_policy={type: tis, threshold: 2.0}",
        ],
    )
    job = Job.start(cfg)
    try:
        stages = job.stages
        push_weights(job, 0)
        prompts = job.data.train_loader.next_batch()
        generated = stages.generate(prompts, step=1, version=0)
        check_declared(stages.generate, set(prompts.keys()), columns(generated))
        scored, _, _ = stages.score(generated)
        check_declared(stages.score, columns(generated), columns(scored))

        batch = scored
        order = stages.experience_order()
        assert [s.name for s in order] == ["reference_log_probs", "old_log_probs", "values"]
        for stage in [*order, stages.advantages]:
            before = columns(batch)
            batch = stage(batch, 1)[0] if stage is stages.advantages else stage(batch)
            check_declared(stage, before, columns(batch))
        assert {"pg_mask", "is_weights"} <= columns(batch)  # the correction's optional writes

        assert set(stages.update_critic(batch)) and set(stages.update_actor(batch, 1))
    finally:
        job.shutdown()


def test_no_stage_is_built_from_the_whole_job():
    """Stages get what they use (config, cluster, stages, state pieces), never a Job."""
    from tidal.controller.stages import advantages, model, rollout, scoring

    for module in (advantages, model, rollout, scoring):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Stage) and cls not in (Stage, model.RoleStage):  # the two bases
                params = inspect.signature(cls.__init__).parameters
                assert "job" not in params, f"{cls.__name__} takes the job"
                assert cls.name and (cls.reads or cls.writes), f"{cls.__name__} declares no columns"
