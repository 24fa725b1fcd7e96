"""The base of every recipe section: unknown keys are errors, values are validated on assignment too,
and a number field takes numbers only. No torch: the CLI imports the schema."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """Base config: unknown keys are errors, assignments are validated, `true` is not a number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        # pydantic's lax mode reads `true` as 1 for an int field: `rollout.speculative_tokens=true`
        # would silently mean one draft. A number field takes numbers only.
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if isinstance(value, bool) and field is not None:
                kinds = _leaf_types(field.annotation)
                if kinds & {int, float} and bool not in kinds and Any not in kinds:
                    raise PydanticCustomError("bool_as_number", "must be a number, not {value}",
                                              {"key": name, "value": str(value).lower()})
        return data


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (`int | None` -> {int, NoneType})."""
    args = get_args(annotation)
    if get_origin(annotation) is Annotated:
        return _leaf_types(args[0])
    if args and get_origin(annotation) in (Union, UnionType):
        return set().union(*(_leaf_types(a) for a in args))
    return {annotation}
