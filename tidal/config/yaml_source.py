"""Read a job's YAML strictly: exact positions for bad bytes and bad syntax, no silent duplicate keys,
no alias bombs, and values in messages cut to a readable length.

PyYAML alone keeps the last of two equal keys, echoes raw parser tracebacks, and builds a structure
whose aliases may stand for millions of values (each of which pydantic would later walk and report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# A real job config holds a few hundred values; ten thousand leaves room for long file lists.
MAX_CONFIG_VALUES = 10_000
# Longest value shown in a message; longer ones are cut in the middle.
MAX_SHOWN_CHARS = 200


class YamlSourceError(ValueError):
    """A config text that cannot be read as a job; the message says where and how to fix it."""


def short(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """repr(value), cut in the middle past `limit` characters (saying how much was left out)."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` cut in the middle past `limit` characters."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}...<{len(text) - 2 * keep} chars cut>...{text[-keep:]}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (merge keys `<<` may be overridden)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if not getattr(node, "_keys_checked", False):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    first = seen[key]
                    raise YamlSourceError(
                        f"key {short(key)} is written twice in one section (line {first.line + 1} and "
                        f"line {key_node.start_mark.line + 1}); keep one of them"
                    )
                seen[key] = key_node.start_mark
            node._keys_checked = True  # type: ignore[attr-defined]
        super().flatten_mapping(node)


def count_values(tree: Any, limit: int = MAX_CONFIG_VALUES) -> int:
    """Values in `tree` counted as if every alias were written out, stopping soon after `limit`.

    Shared sub-trees (YAML aliases) are counted once per use but walked once, so a structure that
    stands for billions of values is measured in microseconds.
    """
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = limit + 1  # a cycle counts as too large
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(node)] = total
        return total

    return size(tree)


def parse_yaml(text: str, source: str) -> Any:
    """Parse `text` (named `source` in messages); raises YamlSourceError on syntax errors,
    duplicate keys, or a structure larger than MAX_CONFIG_VALUES values once aliases expand."""
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlSourceError as err:
        raise YamlSourceError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"
        what = " ".join(part for part in (err.context, err.problem) if part)
        raise YamlSourceError(
            f"{source}: not valid YAML at {where}: {what}; check the indentation, the quoting, and the "
            "': ' after each key there"
        ) from None
    except yaml.YAMLError as err:
        raise YamlSourceError(f"{source}: not valid YAML ({short(str(err))})") from None
    if count_values(tree) > MAX_CONFIG_VALUES:
        raise YamlSourceError(
            f"{source}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases included); a job "
            "config is a few hundred; look for an alias (*name) repeated inside lists"
        )
    return tree


def read_yaml_file(path: Path) -> Any:
    """The parsed file; bad bytes, directories and missing files get errors that name the fix."""
    if path.is_dir():
        first = min((p.name for p in path.glob("*.yaml")), default=None)
        hint = f" such as {str(path / first)!r}" if first else ""
        raise YamlSourceError(
            f"config file {str(path)!r} is a directory; pass the job's YAML file{hint} "
            "(e.g. examples/quickstart.yaml)"
        )
    if not path.is_file():
        raise YamlSourceError(
            f"config file {str(path)!r} does not exist; pass a YAML job file such as examples/quickstart.yaml"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise YamlSourceError(
            f"config file {str(path)!r} is not UTF-8: byte {raw[err.start:err.start + 1]!r} at line {line}, "
            f"column {column}; save the file as UTF-8"
        ) from None
    return parse_yaml(text, f"config file {str(path)!r}")
