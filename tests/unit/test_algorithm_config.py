"""The `algorithm` section and the actor's loss fields: every registered name is reachable from
config, plug-in sections bind to their registry functions, and mistakes are named with the fix."""

from __future__ import annotations

import copy
import functools
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel

import tidal.algorithms as algorithms
from tidal.algorithms import Registry, bind, call_accepting, plugin_kwargs
from tidal.algorithms.plugins import configured_plugins
from tidal.config import ConfigError, config_from_dict
from tidal.config.algorithm import AlgorithmConfig, D3STokenSelection
from tidal.config.loader import apply_overrides
from tidal.config.registry_check import bind_preference_loss

BASE = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}

# One valid section per plug-in type, for every plug-in slot of the algorithm section. The test
# below fails when a slot accepts a type that has no example here, so new types get covered.
SECTIONS: dict[str, list[dict[str, Any]]] = {
    "reward_combination": [
        {"type": "weighted_sum", "components": ["arithmetic", "math_verify"], "weights": [1.0, 0.5]},
        {"type": "min", "components": ["arithmetic", "math_verify"]},
        {"type": "uncertainty_weighted", "components": ["arithmetic"], "uncertainty_coef": 0.3},
    ],
    "reward_shaping": [
        {"type": "overlong", "buffer_length": 8},
        {"type": "length_penalty", "coef": 0.5},
        {"type": "par"},
    ],
    "dynamic_sampling": [{"type": "zero_variance", "max_rounds": 3}],
    "sample_selection": [{"type": "zero_variance"}, {"type": "d3s", "keep_ratio_start": 0.5}],
    "token_selection": [{"type": "high_entropy", "top_ratio": 0.3}, {"type": "d3s", "keep_ratio_start": 0.5}],
    "off_policy": [{"type": "tis", "level": "sequence"}, {"type": "mis"}, {"type": "decoupled", "cap": 4.0}],
}
# Estimators that need another algorithm section to be valid (gdpo: the reward components).
ESTIMATOR_NEEDS = {"gdpo": {"reward_combination": SECTIONS["reward_combination"][0]}}
# Slot -> (registry, attribute of ConfiguredPlugins holding the bound function)
SLOTS = {
    "reward_combination": ("REWARD_COMBINERS", "reward_combiner"),
    "reward_shaping": ("REWARD_SHAPERS", "reward_shapers"),
    "dynamic_sampling": ("SAMPLE_FILTERS", "dynamic_sampling_filter"),
    "sample_selection": ("SAMPLE_FILTERS", "sample_selector"),
    "token_selection": ("TOKEN_SELECTORS", "token_selector"),
    "off_policy": ("OFF_POLICY_CORRECTIONS", "off_policy_correction"),
}


def cfg_with(*overrides: str, algorithm: dict[str, Any] | None = None, **sections: dict[str, Any]):
    tree = copy.deepcopy(BASE)
    if algorithm is not None:
        tree["algorithm"] = algorithm
    tree.update(sections)
    return config_from_dict(apply_overrides(tree, list(overrides)))


def literal_types(annotation: Any) -> set[str]:
    """The `type` literals of every model a (list / optional / annotated / union) annotation accepts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return set(typing.get_args(annotation.model_fields["type"].annotation))
    return {name for arg in typing.get_args(annotation) for name in literal_types(arg)}


def all_registries() -> dict[str, Registry]:
    return {name: value for name, value in vars(algorithms).items() if isinstance(value, Registry)}


def reached_by_plugin_sections() -> set[tuple[str, str]]:
    reached = set()
    for slot, examples in SECTIONS.items():
        registry_name, attribute = SLOTS[slot]
        registry = getattr(algorithms, registry_name)
        for example in examples:
            value = [example] if slot == "reward_shaping" else example
            bound = getattr(configured_plugins(cfg_with(algorithm={slot: value})), attribute)
            bound = bound[0] if slot == "reward_shaping" else bound
            assert isinstance(bound, functools.partial)
            assert bound.func is registry.get(example["type"]), (slot, example)
            reached.add((registry_name, example["type"]))
    return reached


def test_plugin_examples_cover_every_type_each_slot_accepts():
    for slot, examples in SECTIONS.items():
        accepted = literal_types(AlgorithmConfig.model_fields[slot].annotation)
        assert {e["type"] for e in examples} == accepted, slot
        registry = getattr(algorithms, SLOTS[slot][0])
        assert accepted <= set(registry.names()), f"algorithm.{slot} accepts names its registry lacks"


def test_every_registered_name_is_reachable_from_config():
    reached = reached_by_plugin_sections()
    for name in algorithms.ADVANTAGE_ESTIMATORS.names():
        section = {"advantage_estimator": name, **ESTIMATOR_NEEDS.get(name, {})}
        assert cfg_with(algorithm=section).algorithm.advantage_estimator == name
        reached.add(("ADVANTAGE_ESTIMATORS", name))
    required = {"dro": ["actor.dro_beta=0.1"]}  # losses with a parameter that has no default (verl's)
    for name in algorithms.POLICY_LOSSES.names():
        assert cfg_with(f"actor.policy_loss={name}", *required.get(name, [])).actor.policy_loss == name
        reached.add(("POLICY_LOSSES", name))
    for name in algorithms.KL_ESTIMATORS.names():
        cfg = cfg_with("actor.use_kl_loss=true", f"actor.kl_loss_type={name}", f"algorithm.kl_penalty={name}")
        assert (cfg.actor.kl_loss_type, cfg.algorithm.kl_penalty) == (name, name)
        reached.add(("KL_ESTIMATORS", name))
    for name in algorithms.PREFERENCE_LOSSES.names():
        bound = bind_preference_loss(cfg_with(algorithm={"preference": {"type": name}}))
        assert bound.func is algorithms.PREFERENCE_LOSSES.get(name)
        reached.add(("PREFERENCE_LOSSES", name))
    for mode in (*algorithms.LOSS_AGG_MODES, *algorithms.LOSS_AGG_ALIASES):
        assert (
            cfg_with(f"actor.loss_agg_mode={mode}", f"critic.loss_agg_mode={mode}").actor.loss_agg_mode
            == mode
        )
    expected = {
        (registry_name, name)
        for registry_name, registry in all_registries().items()
        for name in registry.names()
    }
    assert not expected - reached, f"registered but not reachable from config: {sorted(expected - reached)}"


PAR_DATA = "{type: par, baseline: data}"


def test_par_data_baseline_reads_the_reference_column():
    cfg = cfg_with(
        f"algorithm.reward_shaping=[{PAR_DATA}]",
        "data.reference_response_key=answers.sft",
        data={"train_files": ["t.jsonl"]},
    )
    assert cfg.algorithm.par_baseline == "data" and cfg.algorithm.needs_reward_baselines
    assert cfg.data.reference_response_key == "answers.sft"
    (shaper,) = configured_plugins(cfg).reward_shapers
    assert shaper.func is algorithms.REWARD_SHAPERS.get("par") and shaper.keywords == {"baseline": "data"}
    assert cfg_with("algorithm.reward_shaping=[{type: par}]").algorithm.par_baseline == "greedy"
    assert cfg_with().algorithm.par_baseline is None


def test_program_side_needs_follow_the_config():
    assert not cfg_with().algorithm.needs_reward_baselines
    assert cfg_with("algorithm.advantage_estimator=remax").algorithm.needs_reward_baselines
    assert cfg_with(algorithm={"reward_shaping": [{"type": "par"}]}).algorithm.needs_reward_baselines
    assert not cfg_with().algorithm.needs_trainer_log_probs
    assert cfg_with(algorithm={"token_selection": {"type": "high_entropy"}}).algorithm.needs_trainer_log_probs
    assert cfg_with(algorithm={"off_policy": {"type": "tis"}}).algorithm.needs_trainer_log_probs


def test_loss_parameters_are_config_fields():
    cfg = cfg_with("actor.policy_loss=sapo", "actor.sapo_tau_pos=0.5", "actor.sapo_tau_neg=2.0")
    assert (cfg.actor.sapo_tau_pos, cfg.actor.sapo_tau_neg) == (0.5, 2.0)
    cfg = cfg_with("actor.policy_loss=clip_cov", "actor.clip_cov_ratio=0.01", "actor.clip_cov_ub=9")
    assert (cfg.actor.clip_cov_ratio, cfg.actor.clip_cov_ub) == (0.01, 9.0)
    cfg = cfg_with("actor.policy_loss=kl_cov", "actor.kl_cov_ratio=0.1", "actor.kl_cov_coef=0.5")
    assert (cfg.actor.kl_cov_ratio, cfg.actor.kl_cov_coef) == (0.1, 0.5)
    assert cfg_with("actor.clip_ratio_c=5").actor.clip_ratio_c == 5.0
    overlong = configured_plugins(
        cfg_with(algorithm={"reward_shaping": [{"type": "overlong", "buffer_length": 8}]})
    )
    # the window's limit defaults to the generation limit
    assert overlong.reward_shapers[0].keywords == {
        "buffer_length": 8,
        "penalty_factor": 1.0,
        "max_response_length": 32,
    }


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["algorithm.advantage_estimator=grp"],
            ["algorithm.advantage_estimator='grp'", "did you mean 'grpo'"],
        ),
        (["actor.kl_loss_type=k4"], ["actor.kl_loss_type='k4'", "pick one of"]),
        (["algorithm.token_selection.type=top"], ["algorithm.token_selection", "'top'", "'high_entropy'"]),
        (
            ["algorithm.token_selection.type=high_entropy", "algorithm.token_selection.top_ratio=1.5"],
            ["algorithm.token_selection.top_ratio=1.5", "less than or equal to 1"],
        ),
        (["algorithm.token_selection.type=d3s"], ["algorithm.token_selection.keep_ratio_start"]),
        (
            ["algorithm.reward_shaping=[{type: overlong, buffer_length: 40}]"],
            ["algorithm.reward_shaping.0.buffer_length=40", "rollout.sampling.max_new_tokens"],
        ),
        (
            ["algorithm.reward_shaping=[{type: overlong, buffer_length: 4, window: 3}]"],
            ["algorithm.reward_shaping.0.window: unknown key"],
        ),
        (["actor.sapo_tau_pos=2"], ["actor.sapo_tau_pos is set", "actor.policy_loss=sapo"]),
        (["actor.policy_loss=clip_cov", "actor.clip_cov_lb=6"], ["actor.clip_cov_lb=6.0 must be below"]),
        (["actor.kl_loss_correct_threshold=1"], ["actor.use_kl_loss=false", "actor.use_kl_loss=true"]),
        (
            ["algorithm.off_policy={type: mis, lower: 2, upper: 1}"],
            ["algorithm.off_policy.lower=2.0 must be below algorithm.off_policy.upper=1.0"],
        ),
        (
            ["algorithm.reward_combination={type: min, components: [arithmetic, exact]}"],
            ["algorithm.reward_combination.components.1='exact' is not registered"],
        ),
        (
            [
                "algorithm.reward_combination={type: min, components: [arithmetic]}",
                "reward.function=arithmetic",
            ],
            ["reward.function='arithmetic' is not used", "algorithm.reward_combination.components"],
        ),
        (
            ["algorithm.reward_combination={type: weighted_sum, components: [arithmetic], weights: [1, 2]}"],
            ["weights has 2 entries for 1 components"],
        ),
        (
            ["algorithm.preference.type=dpp"],
            ["algorithm.preference", "'dpp'", "'dpo'", "'simpo'", "'redi'"],
        ),
        (
            ["algorithm.preference={type: simpo, alpha: 0.5}"],
            [
                "algorithm.preference.alpha=0.5 is a parameter of redi",
                "algorithm.preference.type='simpo' takes ['beta', 'gamma', 'label_smoothing']",
                "set algorithm.preference.type=redi or remove algorithm.preference.alpha",
            ],
        ),
        (
            ["algorithm.preference={type: dpo, sft_steps: 3}"],
            ["algorithm.preference.sft_steps=3 is a parameter of redi", "algorithm.preference.type=redi"],
        ),
        (
            ["algorithm.preference={type: dpo, gamma: 1}"],
            ["algorithm.preference.gamma=1 is a parameter of simpo"],
        ),
        (
            ["algorithm.preference={type: dpo, label_smoothing: 0.5}"],
            ["algorithm.preference.label_smoothing=0.5", "less than 0.5"],
        ),
        (["algorithm.preference={type: redi, alpha: 1.2}"], ["algorithm.preference.alpha=1.2"]),
        (["algorithm.preference={type: dpo, betta: 1}"], ["algorithm.preference.betta: unknown key"]),
        (
            ["algorithm.preference.type=dpo", "reference.enable=false"],
            ["reference.enable=false but algorithm.preference.type=dpo needs the reference"],
        ),
        (
            ["algorithm.preference.type=simpo", "reference.enable=true"],
            ["reference.enable=true but algorithm.preference.type=simpo is reference-free"],
        ),
        (
            ["algorithm.preference.type=redi", "actor.use_kl_loss=true"],
            ["actor.use_kl_loss=true but algorithm.preference.type=redi", "remove actor.use_kl_loss"],
        ),
        (
            ["data.chosen_key=answers.good"],
            ["data.chosen_key describes preference pairs", "set algorithm.preference.type"],
        ),
        (
            [f"algorithm.reward_shaping=[{PAR_DATA}]", "data.train_files=[t.jsonl]"],
            ["par baseline=data", "data.reference_response_key is not set", "par baseline=greedy"],
        ),
        (
            [f"algorithm.reward_shaping=[{PAR_DATA}]", "data.reference_response_key=reference"],
            ["data.train_files is empty", "(arithmetic) has none", "give data.train_files"],
        ),
        (
            ["data.reference_response_key=reference"],
            ["data.reference_response_key='reference' but nothing reads it", "baseline: data"],
        ),
        (
            ["algorithm.reward_shaping=[{type: par}]", "data.reference_response_key=reference"],
            ["data.reference_response_key='reference' but nothing reads it"],
        ),
        (
            [f"algorithm.reward_shaping=[{PAR_DATA}]", "algorithm.advantage_estimator=remax"],
            ["advantage_estimator=remax", "par baseline=data", "both would write the reward_baselines"],
        ),
        (
            [f"algorithm.reward_shaping=[{PAR_DATA}, {{type: par}}]"],
            ["par sections with baseline=['data', 'greedy']"],
        ),
        (["algorithm.reward_shaping=[{type: par, baseline: sft}]"], ["baseline", "'greedy' or 'data'"]),
    ],
)
def test_mistakes_name_the_field_the_value_and_the_fix(overrides, needles):
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_bind_rejects_a_field_the_function_does_not_take():
    section = types.SimpleNamespace(
        type="high_entropy", model_dump=lambda exclude: {"top_ratio": 0.2, "threshold": 1.0}
    )
    with pytest.raises(
        ValueError, match=r"algorithm.token_selection.threshold is not a parameter of token selector"
    ):
        bind(algorithms.TOKEN_SELECTORS, section, "algorithm.token_selection")
    section.type = "nope"
    with pytest.raises(ValueError, match=r"algorithm.token_selection.type='nope' is not registered.*pick one of"):
        bind(algorithms.TOKEN_SELECTORS, section, "algorithm.token_selection")


def test_schedules_move_from_start_to_end():
    section = D3STokenSelection(keep_ratio_start=0.2, keep_ratio_end=1.0, schedule_steps=10)
    assert plugin_kwargs(section, step=0) == {"keep_ratio": pytest.approx(0.2)}
    assert plugin_kwargs(section, step=5) == {"keep_ratio": pytest.approx(0.6)}
    assert plugin_kwargs(section, step=25) == {"keep_ratio": pytest.approx(1.0)}
    fixed = D3STokenSelection(keep_ratio_start=0.2, keep_ratio_end=0.7)  # no schedule steps: the end value
    assert plugin_kwargs(fixed, step=0) == {"keep_ratio": pytest.approx(0.7)}


def test_call_accepting_passes_only_declared_inputs():
    def fn(a, *, values=None, entropy):
        return a, values, entropy

    assert call_accepting(fn, 1, entropy=2, reward_baselines=3) == (1, None, 2)
    assert call_accepting(lambda a, **kw: sorted(kw), 0, x=1, y=2) == ["x", "y"]


def model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in model_types(arg)]


def key_exists(path: str) -> bool:
    """Whether `a.b[].c` is a field path of JobConfig (any member of a union may hold the next key)."""
    from tidal.config.schema import JobConfig

    models: list[type[BaseModel]] = [JobConfig]
    for part in path.removesuffix("[]").split("."):
        fields = [
            m.model_fields[part.removesuffix("[]")]
            for m in models
            if part.removesuffix("[]") in m.model_fields
        ]
        if not fields:
            return False
        models = [model for field in fields for model in model_types(field.annotation)]
    return True


def test_every_config_key_on_the_docs_page_exists():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "algorithms.md").read_text()
    roots = ("algorithm.", "actor.", "critic.", "rollout.", "trainer.", "reward.", "reference.")
    checked, missing = 0, []
    for line in text.splitlines():
        parent = None
        for token in re.findall(r"`([^`\s]+)`", line):
            token = token.split("=")[0]
            if token.startswith(roots):
                parent = token.rsplit(".", 1)[0]
                path = token
            elif token.startswith(".") and parent is not None:
                path = parent + token
            else:
                continue
            checked += 1
            if not key_exists(path):
                missing.append(path)
    assert checked > 40
    assert not missing, f"docs/algorithms.md names config keys that do not exist: {missing}"


def test_preference_section_picks_the_loss_its_parameters_and_the_roles():
    from tidal.controller.cluster import role_classes

    redi = cfg_with(algorithm={"preference": {"type": "redi", "alpha": 0.5, "sft_steps": 3}})
    assert bind_preference_loss(redi).keywords == {"alpha": 0.5}  # sft_steps is the program's
    assert redi.algorithm.preference.sft_steps == 3
    simpo = cfg_with(algorithm={"preference": {"type": "simpo"}})
    assert bind_preference_loss(simpo).keywords == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}
    dpo = cfg_with("algorithm.preference.type=dpo", "algorithm.preference.beta=0.3")
    assert bind_preference_loss(dpo).keywords == {"beta": 0.3, "label_smoothing": 0.0}
    # DPO compares with the frozen reference; SimPO and REDI are reference-free. The rollout only
    # serves the built-in task's greedy evaluation: pair files start the actor alone.
    assert (dpo.reference_enabled, simpo.reference_enabled, redi.reference_enabled) == (True, False, False)
    assert set(role_classes(dpo)) == {"actor", "rollout", "reference"}
    assert role_classes(dpo)["reference"].__name__ == "PairReferenceRole"
    files = {"model": {"path": "/tmp/m"}, "data": {"train_files": ["pairs.jsonl"]}}
    assert set(role_classes(config_from_dict({**files, "algorithm": {"preference": {"type": "simpo"}}}))) == {
        "actor"
    }
    assert set(role_classes(cfg_with())) == {"actor", "rollout"}  # RL as before
