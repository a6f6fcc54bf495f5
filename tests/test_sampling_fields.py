"""The sampling-field declaration (common/sampling_fields.py) against everything it
drives: the dataclasses, both .proto files, the OpenAI body, and the range checks of the
API edge, the scheduler and the executor, which must agree on every boundary."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tessera.common.plan import SamplingOptions
from tessera.common.sampling_fields import FIELDS, Range, check
from tessera.common.sampling_params import SamplingParams
from tessera.common.wire import sampling_from_pb, sampling_to_pb
from tessera.executor.sampling_batch import check_option
from tessera.proto.tessera.v1 import engine_pb2, generate_pb2
from tessera.scheduler.messages import check_sampling
from tessera.services.openai_protocol import ChatCompletionRequest, CompletionRequest

VOCAB = 1000


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_every_field_exists_where_it_is_declared_to_travel():
    params, options = _defaults(SamplingParams), _defaults(SamplingOptions)
    public_pb = generate_pb2.SamplingParameters.DESCRIPTOR.fields_by_name
    engine_pb = engine_pb2.SamplingOptions.DESCRIPTOR.fields_by_name
    body = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    for spec in FIELDS:
        assert params[spec.name] == spec.default, spec.name
        if spec.public:
            assert public_pb[spec.name].has_presence, f"{spec.name}: optional in the proto"
            assert spec.name in body or spec.name == "logprobs", spec.name
        if spec.engine:
            assert options[spec.name] == spec.default, spec.name
            assert spec.name in engine_pb, spec.name
            assert spec.optional == engine_pb[spec.name].has_presence, spec.name


def test_range_boundaries_and_non_finite_values():
    assert 0.0 not in Range(0, 1, low_open=True) and 1.0 in Range(0, 1, low_open=True)
    assert -2.0 in Range(-2, 2) and 2.5 not in Range(-2, 2)
    assert 1e300 in Range(0) and math.inf not in Range(0) and math.nan not in Range(0)
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and str(Range(0)) == ">= 0"


def _bad_values():
    for spec in FIELDS:
        if spec.valid is None:
            continue
        r = spec.valid
        if r.low is not None:
            # ints: two below (top_k -1 is "disabled" at the public edge, as in vLLM)
            yield spec.name, r.low if r.low_open else r.low - (2 if spec.type is int else 0.5)
        if r.high is not None:
            yield spec.name, r.high + 1
        if spec.type is float:
            yield spec.name, math.nan


@pytest.mark.parametrize(("name", "value"), list(_bad_values()))
def test_every_layer_refuses_a_value_out_of_range_and_names_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        check(name, value)
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})
    spec = next(f for f in FIELDS if f.name == name)
    if spec.engine:
        options = dataclasses.replace(SamplingOptions(), **{name: value})
        with pytest.raises(ValueError, match=name):
            check_sampling(options, VOCAB)
        with pytest.raises(ValueError, match=name):
            check_option(options, VOCAB)


def test_edge_values_pass_every_layer_and_survive_the_wire():
    edge = {"temperature": 0.0, "top_p": 1e-6, "top_k": 7, "min_p": 1.0,
            "repetition_penalty": 1e-3, "presence_penalty": -2.0, "frequency_penalty": 2.0,
            "seed": 2**63 - 1, "min_tokens": 3, "logprobs": 20}  # fmt: skip
    options = SamplingParams(**edge, max_tokens=5).to_options(eos_token_ids=(2,))
    check_sampling(options, VOCAB)
    check_option(options, VOCAB)
    back = sampling_from_pb(sampling_to_pb(options))
    for name, value in edge.items():
        assert getattr(back, name) == pytest.approx(value, rel=1e-6), name
    assert back.min_tokens_blocked_ids == (2,)
    unset = sampling_from_pb(sampling_to_pb(SamplingOptions()))
    assert unset.seed is None and unset.logprobs is None


def test_constraint_kinds_are_the_same_on_every_layer():
    """The constraint kinds (common/constraints.py KINDS) are the members of the public
    oneof, of the engine's Constraint oneof, and of vLLM's structured_outputs body (where
    json_schema is spelled json)."""
    from tessera.common.constraints import KINDS
    from tessera.services.openai_structured import StructuredOutputs

    public = generate_pb2.SamplingParameters.DESCRIPTOR.oneofs_by_name["constraint"]
    engine = engine_pb2.Constraint.DESCRIPTOR.oneofs_by_name["kind"]
    assert [f.name for f in public.fields] == list(KINDS)
    assert [f.name for f in engine.fields] == list(KINDS)
    body = {f.alias or name for name, f in StructuredOutputs.model_fields.items()}
    assert body == {"json" if k == "json_schema" else k for k in KINDS}
