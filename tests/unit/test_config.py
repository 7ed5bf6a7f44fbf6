import pytest

from tidal.config import ConfigError, config_from_dict, load_config
from tidal.config.loader import apply_overrides, parse_override

BASE = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}


def cfg_with(*overrides: str):
    import copy

    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def test_overrides_parse_yaml_values():
    assert parse_override("actor.optim.lr=1e-5") == (["actor", "optim", "lr"], 1e-5)
    assert parse_override("data.train_files=[a.jsonl, b.parquet]")[1] == ["a.jsonl", "b.parquet"]
    cfg = cfg_with("trainer.total_steps=7", "rollout.sampling.n=4", "actor.optim.lr=0.001")
    assert cfg.trainer.total_steps == 7 and cfg.rollout.sampling.n == 4 and cfg.actor.optim.lr == 1e-3


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("actor.optim.lrr=1e-5", "actor.optim.lrr: unknown key"),
        ("trainer.total_steps=many", "trainer.total_steps='many'"),
        ("rollout.sampling.n=1", "rollout.sampling.n=1"),  # GRPO needs a group
        ("actor.pool=gpu", "actor.pool='gpu' names no pool"),
        ("critic.enable=false", ""),  # fine with grpo
        ("algorithm.advantage_estimator=nope", "algorithm.advantage_estimator='nope' is not registered"),
        ("actor.loss_agg_mode=avg", "actor.loss_agg_mode='avg'"),
        ("reward.function=bogus", "reward.function='bogus'"),
        ("reference.model_path=/teacher", "reference.model_path='/teacher' but nothing uses the reference"),
    ],
)
def test_bad_settings_name_field_value_and_fix(override, needle):
    if not needle:
        cfg_with(override)
        return
    with pytest.raises(ConfigError) as err:
        cfg_with(override)
    assert needle in str(err.value)


def test_gae_without_critic_is_rejected():
    with pytest.raises(ConfigError, match="critic.enable=false"):
        cfg_with("algorithm.advantage_estimator=gae", "critic.enable=false")


def test_roles_follow_the_algorithm():
    assert not cfg_with().critic_enabled and not cfg_with().reference_enabled
    assert cfg_with("algorithm.advantage_estimator=gae").critic_enabled
    assert cfg_with("actor.use_kl_loss=true").reference_enabled


def test_batch_sizes_are_derived_with_uneven_mini_batches():
    sizes = cfg_with(
        "trainer.prompts_per_step=10", "rollout.sampling.n=4", "actor.mini_batch_prompts=4"
    ).sizes
    assert sizes.samples_per_step == 40 and sizes.mini_batch_samples == 16 and sizes.num_mini_batches == 3


def test_a_missing_required_section_is_named():
    with pytest.raises(ConfigError, match=r"model: required but not set; .* model.KEY=VALUE"):
        load_config(None, ["data.task.type=arithmetic"])


def test_missing_file_and_bad_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="has no '='"):
        load_config(None, ["trainer.total_steps"])


def test_examples_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml")):
        load_config(path)


def test_rollout_backends_are_sections_with_their_own_fields():
    cfg = cfg_with("rollout.backend.type=vllm", "rollout.backend.max_num_seqs=8")
    assert cfg.rollout.backend.type == "vllm" and cfg.rollout.backend.max_num_seqs == 8
    assert cfg_with().rollout.backend.type == "embedded"
    with pytest.raises(ConfigError, match="mem_fraction_static"):
        cfg_with("rollout.backend={type: vllm, mem_fraction_static: 0.3}")  # SGLang's field, not vLLM's


def test_sglang_needs_a_gpu_and_cannot_stream_yet():
    with pytest.raises(ConfigError, match="sglang needs a GPU"):
        cfg_with("rollout.backend=sglang")
    gpu = ["resources.pools.default.gpus_per_worker=1", "resources.pools.rollout={gpus_per_worker: 1}"]
    cfg_with("rollout.backend=sglang", *gpu)
    with pytest.raises(ConfigError, match="sglang has no continuous batching yet"):
        cfg_with("rollout.backend=sglang", *gpu, "rollout.pool=rollout", "trainer.mode=streaming")


def test_the_default_rollout_engine_follows_the_device():
    assert cfg_with().rollout.backend.type == "embedded"  # CPU: faster for small models (measured)
    assert cfg_with("resources.pools.default.gpus_per_worker=1").rollout.backend.type == "vllm"
    assert cfg_with("resources.pools.default.gpus_per_worker=1", "rollout.backend=embedded").rollout.backend.type == (
        "embedded"
    )
    with pytest.raises(ConfigError, match="rollout.max_batch_size=8 sizes the embedded engine's batch"):
        cfg_with("rollout.backend=vllm", "rollout.max_batch_size=8")


def test_a_tensor_parallel_rollout_needs_a_pool_of_its_own_in_sync_mode():
    tp2 = "rollout.backend={type: vllm, tensor_parallel_size: 2}"
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 spans the workers of rollout.pool='default'"):
        cfg_with(tp2)
    own = ["resources.pools={default: {}, rollout: {num_workers: 2}}", "rollout.pool=rollout"]
    assert cfg_with(tp2, *own).rollout.backend.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="num_workers=3: one tensor-parallel engine per pool"):
        cfg_with(tp2, "resources.pools={default: {}, rollout: {num_workers: 3}}", "rollout.pool=rollout")
    with pytest.raises(ConfigError, match="trainer.mode=streaming is not built yet"):
        cfg_with(tp2, *own, "trainer.mode=streaming")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["rollout.backend=vllm", "rollout.sampling={n: 8, top_p: 0.9}"], "top_p=0.9 with rollout.backend.type=vllm"),
        (["rollout.backend={type: vllm, max_num_seqs: 4}", "rollout.sampling.n=8"], "raise max_num_seqs"),
        (["rollout.backend={type: vllm, max_model_len: 64}"], "max_model_len=64 is shorter than"),
        (["rollout.backend={type: vllm, gpu_memory_utilization: 0.8}"], "gpu_memory_utilization=0.8 does nothing"),
        (["rollout.backend={type: vllm, enable_sleep_mode: true}"], "enable_sleep_mode=True does nothing"),
        (
            ["resources.pools.default.gpus_per_worker=1", "rollout.backend={type: vllm, kv_cache_gb: 2}"],
            "kv_cache_gb=2.0 does nothing for vllm on GPU",
        ),
        (
            ["resources.pools.default.gpus_per_worker=1", "rollout.backend={type: sglang, tp_size: 2}"],
            "tp_size=2: SGLang's tensor parallelism",
        ),
    ],
)
def test_settings_a_rollout_engine_would_ignore_or_get_wrong_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)
    assert needle in str(err.value)


def test_the_embedded_batch_setting_keeps_the_embedded_engine_on_gpu():
    cfg = cfg_with("resources.pools.default.gpus_per_worker=1", "rollout.max_batch_size=64")
    assert cfg.rollout.backend.type == "embedded"


def test_model_shapes_a_tensor_parallel_split_cannot_take():
    from tidal.config.rollout_backend import VLLMBackend, model_problems

    def problems(tp: int, heads: int, kv: int) -> list[str]:
        return model_problems(VLLMBackend(tensor_parallel_size=tp), num_heads=heads, num_kv_heads=kv, head_dim=64, on_gpu=True)

    assert problems(2, 8, 2) == [] and problems(4, 8, 2) == [] and problems(8, 8, 2) == []
    assert "does not divide the model's 6 attention heads" in problems(4, 6, 6)[0]
    assert "KV heads cannot be split" in problems(4, 12, 6)[0]  # 6 KV heads over 4 ranks
    assert "KV heads cannot be split" in problems(6, 12, 4)[0]  # 6 ranks over 4 KV heads
