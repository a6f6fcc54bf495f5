"""Structured output on the default model, offline: every output of 20 JSON schemas
validates with the ``jsonschema`` library (the outside reference), regexes full-match
(``re``), choices are one of the choices, a grammar's outputs parse with an independent
parser; greedy and sampled, batched with unconstrained rows, and through preemption
(the grammar state replayed from the tokens already generated)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tessera import LLM, SamplingParams
from tessera.common.constraints import Constraint

pytestmark = pytest.mark.slow

S = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
     "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
     "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1,
     "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10},
        "y": {"type": "number", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "exclusiveMinimum": 0,
     "maximum": 1000}, "note": S}, "required": ["id"], "additionalProperties": False},
    {"$defs": {"person": {"type": "object", "properties": {"name": S},
     "required": ["name"], "additionalProperties": False}},
     "type": "object", "properties": {"author": {"$ref": "#/$defs/person"},
     "editor": {"$ref": "#/$defs/person"}}, "required": ["author", "editor"],
     "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {
     "type": "integer", "minimum": 0, "maximum": 50}}, "required": ["status", "count"],
     "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
     "maximum": 9}, {"type": "boolean"}]}}, "required": ["value"],
     "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "minItems": 1,
     "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
     "minItems": 1, "maxItems": 2}}}, "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string",
     "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"],
     "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0,
     "maximum": 100}, "currency": {"enum": ["USD", "EUR"]}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "boolean"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
     "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1,
     "maximum": 5}}, "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"first": S, "middle": S, "last": S},
     "required": ["first", "last"], "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
     S], "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
     "flags": {"type": "array", "maxItems": 2,
     "items": {"type": "boolean"}}}, "required": ["level", "flags"],
     "additionalProperties": False},
]  # fmt: skip
assert len(SCHEMAS) == 20

FREE = "Write one sentence about the sea."


def _prompt(schema: dict) -> str:
    return f"Answer with JSON that follows this schema: {json.dumps(schema)}\nJSON:"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu", show_progress=False)


def _schema_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=160, constraint=Constraint.json_schema(schema), **kw)


def _check_all(outputs, schemas) -> None:
    for i, (out, schema) in enumerate(zip(outputs, schemas, strict=True)):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", f"schema {i}: {text!r} did not finish"
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_twenty_schemas_batched_with_free_rows(llm, sampled) -> None:
    kw = {"temperature": 0.8, "top_p": 0.95} if sampled else {"temperature": 0.0}
    schemas = SCHEMAS[1::2] if sampled else SCHEMAS  # sampled: half of them, for time
    prompts, params = [], []
    for i, schema in enumerate(schemas):
        prompts.append(_prompt(schema))
        params.append(_schema_params(schema, **kw, **({"seed": i} if sampled else {})))
        if i % 4 == 0:  # unconstrained rows in the same batches
            prompts.append(FREE)
            params.append(SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    constrained = [o for o, p in zip(outputs, params, strict=True) if p.constraint is not None]
    _check_all(constrained, schemas)
    free = [o for o, p in zip(outputs, params, strict=True) if p.constraint is None]
    alone = llm.generate([FREE], SamplingParams(temperature=0.0, max_tokens=24,
                                                ignore_eos=True), use_tqdm=False)[0]
    for out in free:  # the free rows are untouched by their constrained neighbours
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_regex_choice_and_grammar(llm) -> None:
    regexes = [r"[0-9]{3}-[0-9]{4}", r"(cat|dog)s? (run|sleep)", r"[A-Z][a-z]{2,6}!"]
    choices = ["Paris", "London", "Rome", "New York"]
    grammar = 'root ::= "(" expr ")"\nexpr ::= num ("+" num)? ("+" num)?\nnum ::= [1-9] [0-9]?'
    params = [SamplingParams(temperature=t, seed=3, max_tokens=40, constraint=Constraint(
        "regex", r)) for r in regexes for t in (0.0, 1.0)]
    params += [SamplingParams(temperature=t, seed=5, max_tokens=10,
                              constraint=Constraint.choice(choices)) for t in (0.0, 1.0)]
    params += [SamplingParams(temperature=t, seed=7, max_tokens=60,
                              constraint=Constraint("grammar", grammar)) for t in (0.0, 1.0)]
    prompts = ["Give me a phone number:"] * 2 + ["Pets:"] * 2 + ["Shout a name:"] * 2
    prompts += ["The capital of Italy is"] * 2 + ["A sum of small numbers:"] * 2
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for out, r in zip(outs[:6], [r for r in regexes for _ in (0, 1)], strict=True):
        assert re.fullmatch(r, out.text), (r, out.text)
        assert out.finish_reason == "stop"
    for out in outs[6:8]:
        assert out.text in choices and out.finish_reason == "stop"
    for out in outs[8:]:  # parsed by hand: ( n [+ n [+ n]] ) with 1..99, no leading zero
        assert re.fullmatch(r"\([1-9][0-9]?(?:\+[1-9][0-9]?){0,2}\)", out.text), out.text
        assert out.finish_reason == "stop"
        inner = out.text[1:-1].split("+")
        assert all(1 <= int(n) <= 99 for n in inner)


def test_preempted_constrained_requests_replay_their_grammar(llm) -> None:
    """A pool too small for the batch forces preemption; a preempted request comes back
    with its outputs so far, which the executor replays into a fresh matcher: greedy
    outputs are those of a run without preemption, and every one validates."""
    schemas = [SCHEMAS[i] for i in (0, 3, 4, 5, 7, 10, 14, 16)]  # closed, with some length
    prompts = [f"JSON number {i}:" for i in range(len(schemas))]  # short: outputs dominate
    params = [_schema_params(s, temperature=0.0) for s in schemas]
    reference = llm.generate(prompts, params, use_tqdm=False)
    longest = max(len(r.prompt_token_ids) + len(r.outputs[0].token_ids) for r in reference)
    tight = LLM("smollm2-135m-instruct", device="cpu", show_progress=False,
                num_kv_blocks=-(-longest // 16) + 2)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    _check_all(outputs, schemas)
    for ref, out in zip(reference, outputs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
