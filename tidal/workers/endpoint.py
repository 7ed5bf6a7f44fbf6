"""How a role method is called by the controller: dispatch (who runs it, on what) and collect.

A role declares this once, next to the method; the controller reads it and never needs to know
what the method does:

    class ActorRole:
        @endpoint(Dispatch.DP_SPLIT)
        def compute_log_probs(self, batch: Batch) -> Batch: ...

        @endpoint(Dispatch.ALL, collect=Collect.FIRST)
        def save_checkpoint(self, path: str) -> None: ...
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Dispatch(enum.Enum):
    ALL = "all"  # every rank gets the same arguments
    DP_SPLIT = "dp_split"  # Batch arguments split by data-parallel rank (uneven tail allowed)
    RANK_ZERO = "rank_zero"  # only rank 0 runs


class Collect(enum.Enum):
    CONCAT = "concat"  # Batch results concatenated in data-parallel order (kept as object refs)
    FIRST = "first"  # one result (ranks agree, e.g. all-reduced metrics)
    LIST = "list"  # every rank's result, in rank order


@dataclass(frozen=True)
class EndpointSpec:
    dispatch: Dispatch
    collect: Collect


ENDPOINT_ATTR = "__tidal_endpoint__"


def endpoint(dispatch: Dispatch, collect: Collect | None = None) -> Callable[[F], F]:
    """Mark a role method as callable from the controller. DP_SPLIT collects by CONCAT by default."""
    if collect is None:
        collect = {Dispatch.DP_SPLIT: Collect.CONCAT, Dispatch.ALL: Collect.LIST}.get(dispatch, Collect.FIRST)

    def mark(fn: F) -> F:
        setattr(fn, ENDPOINT_ATTR, EndpointSpec(dispatch, collect))
        return fn

    return mark


def endpoint_spec(role_cls: type, method: str) -> EndpointSpec:
    fn = getattr(role_cls, method, None)
    spec = getattr(fn, ENDPOINT_ATTR, None)
    if spec is None:
        raise AttributeError(
            f"{role_cls.__name__}.{method} is not an endpoint; decorate it with @endpoint(...) "
            f"(endpoints: {sorted(endpoints(role_cls))})"
        )
    return spec


def endpoints(role_cls: type) -> dict[str, EndpointSpec]:
    found = {}
    for name in dir(role_cls):
        spec = getattr(getattr(role_cls, name, None), ENDPOINT_ATTR, None)
        if spec is not None:
            found[name] = spec
    return found
