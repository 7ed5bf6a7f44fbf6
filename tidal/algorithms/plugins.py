"""Bind the plug-in a config section names: a registry lookup plus keyword parameters.

A plug-in section of the job config (`tidal/config/algorithm.py`, e.g. `algorithm.token_selection`)
has a `type`, the plug-in's name in a registry, and fields that are its keyword parameters. Two
conventions keep the sections flat:
- `<p>_start`, `<p>_end` and `schedule_steps` together are a schedule: the plug-in receives `<p>`
  = linear_schedule(step, start, end, schedule_steps) (D3S's aggressive-to-relaxed keep ratios);
- a field the program reads itself (`dynamic_sampling.max_rounds`) is named in `exclude`; a field
  left None takes its value from `defaults` (the program's context, such as the generation limit)
  or else the function's own default.
Every other field must be a keyword parameter of the function. `bind` checks that, so a config
section and its function cannot drift apart unnoticed (the config check runs it before training).

`configured_plugins(cfg, step)` binds every section of a job at once (the programs and the config
check share it). `call_accepting(fn, *args, **inputs)` passes only the keyword inputs `fn` declares: a program
offers every optional input it has (values, reward baselines, entropy, advantages) and each
plug-in takes what it needs, so adding a plug-in never changes the program.

Duck-typed on the config (a pydantic model with `type` and `model_dump`): imports only torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tidal.algorithms.filters import linear_schedule
from tidal.registry import (
    OFF_POLICY_CORRECTIONS,
    REWARD_COMBINERS,
    REWARD_SHAPERS,
    SAMPLE_FILTERS,
    TOKEN_SELECTORS,
    Registry,
)

if TYPE_CHECKING:
    from tidal.config.schema import JobConfig

SCHEDULE_STEPS = "schedule_steps"


class PluginSection(Protocol):
    type: str

    def model_dump(self, *, exclude: set[str]) -> dict[str, Any]: ...


def plugin_kwargs(
    section: PluginSection,
    *,
    step: int = 0,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword parameters `section` gives its plug-in at training step `step`."""
    fields = section.model_dump(exclude={"type", *exclude})
    num_steps = fields.pop(SCHEDULE_STEPS, None)
    kwargs: dict[str, Any] = {}
    for key, value in fields.items():
        start_of = key.removesuffix("_start")
        if key.endswith("_start") and f"{start_of}_end" in fields:
            if num_steps is None:
                raise ValueError(f"plug-in section {section.type!r} has {key} but no {SCHEDULE_STEPS} field")
            end = fields[f"{start_of}_end"]
            kwargs[start_of] = linear_schedule(step, start=value, end=end, num_steps=num_steps)
        elif key.endswith("_end") and f"{key.removesuffix('_end')}_start" in fields:
            continue  # consumed with its _start
        elif value is None:
            if defaults is not None and key in defaults:
                kwargs[key] = defaults[key]
        else:
            kwargs[key] = value
    return kwargs


def _keyword_names(fn: Callable[..., Any]) -> set[str] | None:
    """Names `fn` accepts by keyword; None when it takes **kwargs (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def bind(
    registry: Registry[Callable[..., Any]],
    section: PluginSection,
    field: str,
    *,
    step: int = 0,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> functools.partial[Any]:
    """`registry[section.type]` with the section's parameters bound; `field` (the config path,
    e.g. "algorithm.token_selection") names the section in errors."""
    registry.check(f"{field}.type", section.type)
    fn = registry.get(section.type)
    kwargs = plugin_kwargs(section, step=step, exclude=exclude, defaults=defaults)
    accepted = _keyword_names(fn)
    unknown = [] if accepted is None else sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{field}.{unknown[0]} is not a parameter of {registry.kind} {section.type!r} "
            f"(it takes {sorted(accepted or ())}); remove it from the config section"
        )
    return functools.partial(fn, **kwargs)


def call_accepting(fn: Callable[..., Any], *args: Any, **inputs: Any) -> Any:
    """fn(*args, **the inputs fn declares by name); the others are not passed."""
    accepted = _keyword_names(fn)
    return fn(*args, **{k: v for k, v in inputs.items() if accepted is None or k in accepted})


@dataclass(frozen=True)
class ConfiguredPlugins:
    """The plug-ins a job's `algorithm` section picks, bound for one training step (None: off)."""

    reward_combiner: Callable[..., Any] | None
    reward_shapers: list[Callable[..., Any]]
    dynamic_sampling_filter: Callable[..., Any] | None
    sample_selector: Callable[..., Any] | None
    token_selector: Callable[..., Any] | None
    off_policy_correction: Callable[..., Any] | None


def configured_plugins(cfg: JobConfig, step: int = 0) -> ConfiguredPlugins:
    """Bind every plug-in section of `cfg.algorithm` for training step `step`.

    The one place that maps config sections to registries: the programs call it each step and
    the config check calls it before training, so a section that cannot bind never starts a job.
    """
    alg = cfg.algorithm

    def optional(registry: Registry[Any], name: str, **kwargs: Any) -> Callable[..., Any] | None:
        section = getattr(alg, name)
        return None if section is None else bind(registry, section, f"algorithm.{name}", step=step, **kwargs)

    limit = {"max_response_length": cfg.rollout.sampling.max_new_tokens}
    return ConfiguredPlugins(
        reward_combiner=optional(REWARD_COMBINERS, "reward_combination", exclude=("components",)),
        reward_shapers=[
            bind(REWARD_SHAPERS, section, f"algorithm.reward_shaping.{i}", step=step, defaults=limit)
            for i, section in enumerate(alg.reward_shaping)
        ],
        dynamic_sampling_filter=optional(SAMPLE_FILTERS, "dynamic_sampling", exclude=("max_rounds",)),
        sample_selector=optional(SAMPLE_FILTERS, "sample_selection"),
        token_selector=optional(TOKEN_SELECTORS, "token_selection"),
        off_policy_correction=optional(OFF_POLICY_CORRECTIONS, "off_policy"),
    )
