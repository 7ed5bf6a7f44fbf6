"""Load a job from YAML plus `a.b.c=value` overrides, and turn validation errors into one message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tidal.config.schema import JobConfig
from tidal.config.yaml_source import (
    MAX_CONFIG_VALUES,
    YamlSourceError,
    count_values,
    cut,
    parse_yaml,
    read_yaml_file,
    short,
)

MAX_TREE_VALUES = 2 * MAX_CONFIG_VALUES
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A job configuration that must not start. The message names field, value and fix."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`actor.optim.lr=1e-5` -> (['actor', 'optim', 'lr'], 1e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"override {short(text)} has no '='; write it as key.path=value, e.g. trainer.total_steps=5"
        )
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {short(text)} has an empty key segment; write it as key.path=value")
    try:
        value = parse_yaml(raw, f"override {short(text)}") if raw.strip() else None
    except YamlSourceError as err:
        raise ConfigError(str(err)) from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {short(text)}: {part!r} holds {short(child)}, not a section; check the key path"
                )
            node = child
        node[parts[-1]] = value
    return tree


def _user_path(loc: tuple[Any, ...], tree: dict[str, Any]) -> str:
    """The dotted key a user writes for a pydantic error location.

    pydantic inserts parts the user never writes: validator names ("function-after[...]") and the
    tag of a discriminated union ("high_entropy" in algorithm.token_selection.high_entropy.top_ratio).
    Walking the user's own tree drops every part that is not one of its keys or list indices.
    """
    parts: list[str] = []
    node: Any = tree
    for part in loc:
        if str(part).startswith("function-after"):
            continue
        is_tag = isinstance(node, dict) and part not in node and part in node.values()
        if is_tag:  # the union member chosen by the node's own "type" value
            continue
        parts.append(str(part))
        node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
    return ".".join(parts)


def _has(node: dict[str, Any] | list[Any], part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _format_errors(err: ValidationError, tree: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = _user_path(e["loc"], tree)
        if e["type"] == "extra_forbidden":
            lines.append(
                f"{loc}: unknown key (value {short(e['input'])}); check the spelling against tidal/config/schema.py"
            )
        elif e["type"] == "bool_for_number":  # raised by StrictModel for the field named in ctx
            field = ".".join(p for p in (loc, e["ctx"]["field"]) if p)
            lines.append(f"{field}={short(e['ctx']['value'])}: {e['msg']}")
        elif e["type"] == "string_too_short" and not e.get("input"):
            lines.append(f"{loc}='': must not be empty; give a value or remove the key for the default")
        elif e["type"] == "finite_number":
            lines.append(f"{loc}={short(e.get('input'))}: must be a finite number; write one such as 1e-5")
        elif e["type"] == "missing":  # its input is the enclosing section, not a value to show
            lines.append(
                f"{loc}: required but not set; add it to the job file or as an override "
                f"({loc}=VALUE, or {loc}.KEY=VALUE for a section; keys in tidal/config/schema.py)"
            )
        elif e["type"] == "value_error":
            lines.append(cut(str(e["ctx"]["error"]) if "ctx" in e else e["msg"], 1000))
        else:
            lines.append(f"{loc}={short(e.get('input'))}: {cut(e['msg'], 400)}")
    return "invalid job configuration:\n  " + "\n  ".join(lines)


def config_from_dict(tree: dict[str, Any]) -> JobConfig:
    try:
        cfg = JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, tree)) from None
    from tidal.config.registry_check import check_registered_names

    check_registered_names(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read YAML (or start empty), apply overrides, validate everything. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            tree = read_yaml_file(path) or {}
        except YamlSourceError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections (model:, data:, ...) at the top, "
                f"not a {type(tree).__name__}"
            )
    apply_overrides(tree, overrides or [])
    # count_values stops soon after its limit, so it must count up to this limit, not its default.
    if count_values(tree, MAX_TREE_VALUES) > MAX_TREE_VALUES:  # overrides may add aliases' worth too
        raise ConfigError(f"the job config holds more than {MAX_TREE_VALUES} values; a job needs a few hundred")
    return config_from_dict(tree)
