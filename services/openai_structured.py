"""Structured output on the OpenAI front: ``response_format`` (OpenAI's) and
``structured_outputs`` (vLLM's extra body), both read into one ``Constraint``
(common/constraints.py) that the core checks and the executor enforces.

- ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}``. ``strict`` is accepted either way: the schema is always enforced.
- ``structured_outputs``: exactly one of ``json`` (a schema, as an object or JSON text),
  ``json_object``, ``regex``, ``choice`` (a list of strings) or ``grammar``.

Giving both, or more than one kind in ``structured_outputs``, is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tessera.common.constraints import Constraint
from tessera.services.core import ErrorKind, RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extra body (and its older ``guided_*`` spelling's
    meaning): exactly one kind."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def constraint_of(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> Constraint | None:
    """The request's constraint; RequestError if the two fields disagree or are malformed."""
    from_format = _from_response_format(response_format)
    from_structured = _from_structured(structured)
    if from_format is not None and from_structured is not None:
        raise RequestError(
            ErrorKind.INVALID,
            "give response_format or structured_outputs, not both",
            "structured_outputs",
        )
    return from_format or from_structured


def _from_response_format(fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise RequestError(
            ErrorKind.INVALID,
            "response_format of type json_schema needs json_schema.schema",
            "response_format",
        )
    return Constraint.json_schema(json.dumps(fmt.json_schema.schema_))


def _from_structured(so: StructuredOutputs | None) -> Constraint | None:
    if so is None:
        return None
    given = {
        name: value
        for name, value in (
            ("json", so.json_), ("json_object", so.json_object or None), ("regex", so.regex),
            ("choice", so.choice), ("grammar", so.grammar),
        )
        if value is not None
    }  # fmt: skip
    if len(given) != 1:
        raise RequestError(
            ErrorKind.INVALID,
            "structured_outputs takes exactly one of json, json_object, regex, choice, "
            f"grammar; got {', '.join(given) or 'none'}",
            "structured_outputs",
        )
    (kind, value), = given.items()
    try:
        if kind == "json":
            return Constraint.json_schema(value)
        if kind == "json_object":
            return Constraint("json_object")
        if kind == "choice":
            return Constraint.choice(value)
        return Constraint(kind, value)
    except ValueError as e:
        raise RequestError(ErrorKind.INVALID, str(e), "structured_outputs") from None
