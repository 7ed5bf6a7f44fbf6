"""The algorithm section drives a real run: two GRPO steps of a tiny model with DAPO dynamic sampling,
the overlong penalty, PAR against greedy responses, SAPO, high-entropy token selection and truncated
importance sampling, all picked from config and run by the unchanged program (tiny model, ~30 s)."""

from __future__ import annotations

import pytest
from tiny_job import ONE_WORKER, QUIET, WARM_ARITHMETIC, tiny_model

from tidal.config import load_config
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics

pytestmark = pytest.mark.ray


def test_configured_plugins_run_in_the_grpo_program(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_model(tmp_path / "model"),
            *WARM_ARITHMETIC,
            *ONE_WORKER,
            "rollout.sampling.n=4",
            "rollout.sampling.max_new_tokens=4",
            "trainer.prompts_per_step=4",
            "trainer.total_steps=2",
            "trainer.num_eval_prompts=4",
            f"trainer.output_dir={out}",
            *QUIET,
            "actor.optim.lr=1e-3",
            "actor.policy_loss=sapo",
            "actor.sapo_tau_neg=2.0",
            "algorithm.dynamic_sampling={type: zero_variance, max_rounds: 20}",
            "algorithm.reward_shaping=[{type: overlong, buffer_length: 2}, {type: par}]",
            "algorithm.token_selection={type: high_entropy, top_ratio: 0.5}",
            "algorithm.off_policy={type: tis, threshold: 2.0}",
        ],
    )
    train(cfg)
    rows = read_metrics(out / "metrics.jsonl")[1:]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["dynamic_sampling/kept_groups"] == 4  # the step was filled with varying groups
        assert row["dynamic_sampling/rounds"] >= 1
        assert row["shaping/overlong_penalty_mean"] <= 0
        assert 0 < row["shaping/par_mean"] < 1  # PAR against the greedy responses, scored each step
        assert 0 <= row["baseline_reward/mean"] <= 1 and row["baseline_reward/num_errors"] == 0
        assert 0.5 <= row["tokens/pg_fraction"] < 0.75  # top half of the tokens by entropy
        assert row["off_policy/is_mean"] == pytest.approx(1.0, abs=1e-3)  # same weights both sides
        assert row["actor/grad_norm"] > 0
