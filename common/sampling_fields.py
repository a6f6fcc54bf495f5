"""Each scalar sampling field, declared once: its name, type, default, valid range and
where it travels. The rest is derived from this table:

- ``SamplingParams`` (the public API) checks every field's range with ``check``;
- the gateway copies the ``public`` fields from a ``GenerateRequest`` (proto ``optional``
  fields of the same names) and from an OpenAI request body;
- the ``engine`` fields are copied into ``SamplingOptions`` (the step plan) and to and
  from its protobuf (``engine.proto``, same names) by ``common/wire.py``;
- the scheduler and the executor check those ranges again on what arrives from a socket.

So a new scalar field is a row here, a field in each .proto and a dataclass field in
``SamplingParams`` / ``SamplingOptions``; its use (the sampler) is the only code to write.
List-valued settings (stop strings, stop token ids, logit_bias) keep their own checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20


@dataclass(slots=True, frozen=True)
class Range:
    """low <= value <= high (an end may be open, or None for no bound); floats finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (
            f"in {'(' if self.low_open else '['}{_number(self.low)}, "
            f"{_number(self.high)}{')' if self.high_open else ']'}"
        )


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # ints exactly (2**64 - 1)


@dataclass(slots=True, frozen=True)
class SamplingField:
    name: str
    type: type  # float, int or bool
    default: Any
    valid: Range | None  # None: any value of the type
    public: bool  # on the public APIs (GenerateRequest, OpenAI body) under this name
    engine: bool  # carried to the executor in SamplingOptions under this name
    help: str

    @property
    def optional(self) -> bool:
        """None is a value of its own (unset), not a number."""
        return self.default is None


FIELDS: tuple[SamplingField, ...] = (
    SamplingField("n", int, 1, Range(1), True, False, "sequences sampled for the prompt"),
    SamplingField("temperature", float, 1.0, Range(0), True, True, "0 is greedy"),
    SamplingField("top_p", float, 1.0, Range(0, 1, low_open=True), True, True, "1 disables"),
    # top_k: -1 means 0 (disabled) at the public edge, as vLLM takes it
    SamplingField("top_k", int, 0, Range(0), True, True, "0 disables"),
    SamplingField("min_p", float, 0.0, Range(0, 1), True, True, "0 disables"),
    SamplingField(
        "repetition_penalty", float, 1.0, Range(0, low_open=True), True, True,
        "over prompt and output tokens; 1 disables",
    ),
    SamplingField(
        "presence_penalty", float, 0.0, Range(-2, 2), True, True, "over output tokens; 0 disables"
    ),
    SamplingField(
        "frequency_penalty", float, 0.0, Range(-2, 2), True, True, "over output tokens; 0 disables"
    ),
    SamplingField(
        "seed", int, None, Range(0, 2**64 - 1), True, True,  # uint64 on every wire
        "same seed, same tokens, whatever else is in the batch",
    ),
    SamplingField(
        "min_tokens", int, 0, Range(0), True, True, "EOS and stop ids do not stop before this"
    ),
    SamplingField(
        "logprobs", int, None, Range(0, MAX_LOGPROBS), True, True,
        "top alternatives returned with each token",
    ),
    SamplingField("ignore_eos", bool, False, None, True, False, "go on past EOS"),
)  # fmt: skip

BY_NAME = {f.name: f for f in FIELDS}
PUBLIC = tuple(f.name for f in FIELDS if f.public)
ENGINE = tuple(f for f in FIELDS if f.engine)


def check(name: str, value: Any) -> None:
    """ValueError naming the field, its range and the value, unless the value is valid."""
    spec = BY_NAME[name]
    if value is None and spec.optional:
        return
    if spec.valid is not None and value not in spec.valid:
        raise ValueError(f"{name} must be {spec.valid}, got {value}")


def check_all(values: Any, names: tuple[str, ...] | None = None) -> None:
    """``check`` every declared field (or those named) that ``values`` has as an attribute."""
    for spec in FIELDS:
        if (names is None or spec.name in names) and hasattr(values, spec.name):
            check(spec.name, getattr(values, spec.name))
