"""The base of every config section (kept apart so section modules can share it without cycles)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def _is_number_field(annotation: Any) -> bool:
    """int / float / `int | None` ...: a field where a YAML `true` is never what the user meant."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(members) and all(_is_number_field(a) for a in members)
    if origin is typing.Annotated:
        return _is_number_field(typing.get_args(annotation)[0])
    return False


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default.

    Numbers are strict in the two ways a user never means otherwise: a boolean is not a count
    (pydantic would read `prompts_per_step: true` as 1), and inf / NaN are not settings.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if isinstance(value, bool) and field is not None and _is_number_field(field.annotation):
                raise PydanticCustomError(
                    "bool_for_number",
                    "a boolean where a number is expected; write the number itself",
                    {"field": name, "value": value},
                )
        return data
