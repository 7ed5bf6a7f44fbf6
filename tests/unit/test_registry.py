"""The one Registry class (tidal/registry.py) and its catalog: lazy targets, metadata, messages,
torch-free use from the config, and plug-ins registered at runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from tidal import registry as catalog
from tidal.registry import NoMetadata, Registry, check_name

CATALOG = {name: value for name, value in vars(catalog).items() if isinstance(value, Registry)}


@dataclass(frozen=True)
class Meta:
    needs_thing: bool = False
    reads: tuple[str, ...] = ()


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (nothing imported yet); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------------------------------ the class


def test_duplicates_raise_and_a_failed_registration_leaves_nothing():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered; pick another name"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("b", 3, "a")  # the alias clashes: "b" must not stay behind
    assert reg.names() == ("a",) and "b" not in reg and len(reg) == 1


def test_a_miss_names_the_field_the_value_the_closest_name_all_names_and_the_fix():
    reg: Registry[int] = Registry("thing", field="section.thing", hint="; or register your own")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(ValueError) as err:
        reg.get("alpah")
    assert str(err.value) == (
        "section.thing='alpah' is not registered; did you mean 'alpha'? pick one of ['alpha', 'beta']"
        "; or register your own"
    )
    with pytest.raises(
        ValueError, match=r"^other.key='zzz' is not registered; pick one of \['alpha', 'beta'\]"
    ):
        reg.check("other.key", "zzz")
    with pytest.raises(ValueError, match=r"^thing 'x' is not registered"):  # no field: the kind
        Registry("thing").get("x")
    with pytest.raises(ValueError, match=r"^f='c' is not registered; pick one of \['a', 'b'\]$"):
        check_name("f", "c", ["b", "a"])


def test_declared_targets_are_imported_on_first_get_only():
    reg: Registry[object] = Registry("thing")
    reg.declare("dumps", "json:dumps")
    reg.declare("missing", "tidal.no_such_module:fn")  # declaring imports nothing, so it cannot fail
    import json

    assert reg.get("dumps") is json.dumps
    with pytest.raises(ImportError, match=r"thing 'missing' is registered as 'tidal.no_such_module:fn'"):
        reg.get("missing")
    with pytest.raises(ValueError, match="is not 'package.module:attr'"):
        reg.declare("bad", "json.dumps")


def test_metadata_is_typed_filtered_and_read_without_the_implementation():
    reg: Registry[object] = Registry("thing", metadata=Meta)
    reg.declare("lazy", "tidal.no_such_module:fn", "alias", needs_thing=True, reads=("x",))
    reg.add("plain", object())
    assert reg.meta("lazy") == Meta(needs_thing=True, reads=("x",)) and reg.meta("alias") is reg.meta("lazy")
    assert reg.names(needs_thing=True) == ("alias", "lazy") and reg.names(needs_thing=False) == ("plain",)
    assert reg.meta("unknown", missing_ok=True) == Meta()
    with pytest.raises(ValueError, match="not registered"):
        reg.meta("unknown")
    with pytest.raises(
        TypeError, match=r"unknown metadata 'needs_other'; thing entries take \['needs_thing', 'reads'\]"
    ):
        reg.add("typo", object(), needs_other=True)
    assert Registry("plain").meta("x", missing_ok=True) == NoMetadata()


def test_register_decorates_with_aliases_and_metadata():
    reg: Registry[object] = Registry("thing", metadata=Meta)

    @reg.register("fn", "fn_alias", needs_thing=True)
    def fn() -> int:
        return 1

    assert reg.get("fn") is fn and reg.get("fn_alias") is fn and reg.meta("fn").needs_thing


# ---------------------------------------------------------------------------------- the catalog


def test_every_catalog_entry_resolves_to_a_callable():
    assert len(CATALOG) == 12
    for family, reg in CATALOG.items():
        for name in reg.names():
            assert callable(reg.get(name)), f"{family}:{name}"


def test_catalog_metadata_matches_the_implementations():
    """Spot checks that the metadata says what the code does."""
    import torch

    from tidal.algorithms.trl_losses import kl_importance_ratio

    for name in catalog.ADVANTAGE_ESTIMATORS.names(needs_group=True):
        if name in catalog.ADVANTAGE_ESTIMATORS.names(needs_reward_components=True):
            continue  # gdpo refuses a missing group for its components first
        with pytest.raises(ValueError):  # a group estimator cannot run without group ids
            catalog.ADVANTAGE_ESTIMATORS.get(name)(
                torch.ones(2, 3), torch.ones(2, 3), group_ids=None, values=None, config=None
            )
    lp, old, mask = torch.tensor([[0.1, 0.3]]), torch.zeros(1, 2), torch.ones(1, 2)
    for name in catalog.POLICY_LOSSES.names():
        ratio = kl_importance_ratio(lp, old, mask, name)
        per_sequence = bool(torch.allclose(ratio[0, 0], ratio[0, 1]))
        assert per_sequence == catalog.POLICY_LOSSES.meta(name).sequence_ratio, name
    assert catalog.KL_ESTIMATORS.get("k2+") is catalog.KL_ESTIMATORS.get("k2")
    assert catalog.PREFERENCE_LOSSES.names(needs_reference=True) == ("dpo",)


def test_algorithms_and_rewards_use_the_catalog_instances():
    from tidal import algorithms
    from tidal.workers import rewards

    for name, reg in CATALOG.items():
        if name in ("ROLLOUT_ENGINES", "TRAIN_ENGINES"):
            continue  # roles read it from the catalog itself
        home = rewards if name == "REWARD_FUNCTIONS" else algorithms
        assert getattr(home, name) is reg, name
    assert algorithms.Registry is Registry


def test_the_registry_and_the_config_checks_need_no_torch():
    out = run_python(
        """
        import sys
        from tidal.config import registry_check
        from tidal.config.schema import JobConfig
        from tidal.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, REWARD_FUNCTIONS

        tree = {"model": {"path": "m"}, "data": {"task": {"type": "arithmetic"}}}
        cfg = JobConfig.model_validate(tree | {"actor": {"policy_loss": "sapo"}})
        registry_check._check_names(cfg, load_custom=False)
        assert POLICY_LOSSES.meta("sapo").fixed_aggregation == "seq-mean-token-mean"
        assert "grpo" in ADVANTAGE_ESTIMATORS.names(needs_group=True)
        bad = JobConfig.model_validate(tree | {"algorithm": {"advantage_estimator": "grpoo"}})
        try:
            registry_check._check_names(bad, load_custom=False)
        except ValueError as err:
            print(err)
        assert "arithmetic" in REWARD_FUNCTIONS
        print(sorted(m for m in ("torch", "tidal.algorithms", "tidal.workers.rewards.arithmetic") if m in sys.modules))
        """
    )
    message, imported = out.strip().splitlines()
    assert message.startswith("algorithm.advantage_estimator='grpoo' is not registered; did you mean 'grpo'?")
    assert imported == "[]"


def test_plugins_registered_at_runtime_are_checked_by_the_config_like_builtins():
    """A user's estimator and loss, registered with metadata before the config is loaded (in a fresh
    interpreter: the registries are process-wide)."""
    out = run_python(
        """
        import torch
        from tidal.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
        from tidal.config.loader import ConfigError, config_from_dict

        @ADVANTAGE_ESTIMATORS.register("my_group_estimator", needs_group=True)
        def my_estimator(token_rewards, response_mask, *, group_ids, values, config):
            return token_rewards, token_rewards

        @POLICY_LOSSES.register("my_loss", fixed_aggregation="seq-mean-token-mean", reads=("clip_cov_ratio",))
        def my_loss(log_probs, old_log_probs, advantages, mask, *, config, denominator=None, **kwargs):
            return (log_probs * 0).sum(), {}

        base = {"model": {"path": "m"}, "data": {"task": {"type": "arithmetic"}}}
        cfg = config_from_dict(
            base
            | {"algorithm": {"advantage_estimator": "my_group_estimator"}}
            | {"actor": {"policy_loss": "my_loss", "clip_cov_ratio": 0.1}}
        )
        assert cfg.algorithm.needs_group and POLICY_LOSSES.get("my_loss") is my_loss
        for tree in (
            {"algorithm": {"advantage_estimator": "my_group_estimator"}, "rollout": {"sampling": {"n": 1}}},
            {"actor": {"policy_loss": "my_loss", "loss_agg_mode": "token-mean"}},
            {"actor": {"clip_cov_ratio": 0.1}},
        ):
            try:
                config_from_dict(base | tree)
            except ConfigError as err:
                print(str(err).splitlines()[1].strip())
        """
    )
    group, aggregation, reads = out.strip().splitlines()
    assert "advantage_estimator=my_group_estimator compares samples of one prompt" in group
    assert "actor.policy_loss=my_loss always aggregates with seq-mean-token-mean" in aggregation
    assert reads.startswith("actor.clip_cov_ratio is set but actor.policy_loss='vanilla' does not read it")
    assert "set actor.policy_loss=clip_cov or my_loss" in reads
