"""Constraints (common/constraints.py) and their OpenAI and tool surfaces, without a model:
hostile constraints are client errors within the time limit, every kind crosses the
wire unchanged, and tool calls are parsed back whole, streamed or not."""

from __future__ import annotations

import json
import time

import pytest

from tessera.common import constraints
from tessera.common.constraints import Constraint, ConstraintChecker, ConstraintError
from tessera.common.plan import SamplingOptions
from tessera.common.wire import sampling_from_pb, sampling_to_pb
from tessera.services.core import RequestError
from tessera.services.openai_protocol import ChatCompletionRequest, CompletionRequest
from tessera.services.openai_tools import StreamSplitter, parse_tool_calls

KINDS = [
    Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
    Constraint("json_object"),
    Constraint("regex", r"[0-9]{3}-[a-z]+"),
    Constraint.choice(["yes", "no", "maybe"]),
    Constraint("grammar", 'root ::= "(" [0-9]+ ")"'),
]


@pytest.mark.parametrize("constraint", KINDS, ids=lambda c: c.kind)
def test_every_kind_compiles_and_crosses_the_wire(constraint) -> None:
    assert constraints.check(constraint)
    options = SamplingOptions(temperature=0.0, constraint=constraint)
    assert sampling_from_pb(sampling_to_pb(options)) == options


def _deep_schema(depth: int) -> str:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return json.dumps(schema)


HOSTILE = {
    "1 MB schema": Constraint(
        "json_schema",
        json.dumps({"type": "object", "properties": {
            f"p{i}": {"type": "string", "description": "x" * 100} for i in range(10_000)
        }}),
    ),
    "deep nesting": Constraint("json_schema", _deep_schema(200)),
    "deeper than json's recursion": Constraint("json_schema", "[" * 100_000 + "]" * 100_000),
    "unsatisfiable schema": Constraint.json_schema(
        {"type": "integer", "minimum": 10, "maximum": 1}
    ),
    "incompatible allOf": Constraint.json_schema(
        {"allOf": [{"type": "string"}, {"type": "number"}]}
    ),
    "broken regex": Constraint("regex", "[unclosed"),
    "broken grammar": Constraint("grammar", "root ::= ( "),
    "not json": Constraint("json_schema", "{nope"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_constraints_are_client_errors_within_the_limit(name) -> None:
    checker = ConstraintChecker(timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(ConstraintError):
        checker.check(HOSTILE[name])
    assert time.monotonic() - started < 5.0
    started = time.monotonic()
    with pytest.raises(ConstraintError):  # cached: the error again, at once
        checker.check(HOSTILE[name])
    assert time.monotonic() - started < 0.5


def test_a_check_that_outlives_its_limit_is_an_error_not_a_wait() -> None:
    checker = ConstraintChecker(timeout_s=0.0)
    checker._pool.submit(time.sleep, 0.3)  # both workers busy: the check cannot start
    checker._pool.submit(time.sleep, 0.3)
    started = time.monotonic()
    with pytest.raises(ConstraintError, match="longer than"):
        checker.check(Constraint("regex", "[a-z]+"))
    assert time.monotonic() - started < 0.2


def test_choice_checks() -> None:
    with pytest.raises(ValueError):
        Constraint.choice([])
    with pytest.raises(ValueError):
        Constraint("xml")


# -- the OpenAI surface ------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_response_format_and_structured_outputs_become_constraints() -> None:
    body = {"model": "m", "prompt": "p"}
    plain = CompletionRequest.model_validate({**body, "response_format": {"type": "text"}})
    assert plain.sampling(4, None).constraint is None
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    c = CompletionRequest.model_validate({**body, "response_format": fmt}).sampling(4, None)
    assert c.constraint.kind == "json_schema" and json.loads(c.constraint.spec) == SCHEMA
    obj = CompletionRequest.model_validate({**body, "response_format": {"type": "json_object"}})
    assert obj.sampling(4, None).constraint == Constraint("json_object")
    for so, kind in [({"regex": "a+"}, "regex"), ({"choice": ["a", "b"]}, "choice"),
                     ({"json": SCHEMA}, "json_schema"), ({"grammar": "root ::= \"a\""}, "grammar")]:
        req = CompletionRequest.model_validate({**body, "structured_outputs": so})
        assert req.sampling(4, None).constraint.kind == kind


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    {"structured_outputs": {}},
    {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
])
def test_conflicting_or_empty_constraints_are_refused(extra) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", **extra})
    with pytest.raises(RequestError):
        req.sampling(4, None)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_forced_tool_choice_is_a_grammar_that_compiles(choice) -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER, CLOCK], "tool_choice": choice,
    })
    (gen,) = req.to_generation("r")
    assert gen.params.constraint.kind == "grammar"
    assert "get_time" in gen.params.constraint.spec
    assert ("get_weather" in gen.params.constraint.spec) == (choice == "required")
    assert constraints.check(gen.params.constraint)
    assert json.loads(gen.prompt.tools_json)[0]["function"]["name"] == "get_weather"


def test_tool_choice_none_offers_no_tools_and_auto_forces_nothing() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    (none,) = ChatCompletionRequest.model_validate({**base, "tool_choice": "none"}).to_generation(
        "r"
    )
    assert none.prompt.tools_json == "" and none.params.constraint is None
    (auto,) = ChatCompletionRequest.model_validate(base).to_generation("r")
    assert auto.prompt.tools_json and auto.params.constraint is None


def test_a_named_tool_that_is_not_offered_is_refused() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "launch"}},
    })
    with pytest.raises(RequestError, match="launch"):
        req.to_generation("r")


OUTPUT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def test_tool_calls_are_parsed_out_of_the_text() -> None:
    content, calls = parse_tool_calls(OUTPUT)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") == (
        "<tool_call>\nnot json\n</tool_call>", []
    )


def _stream(splitter: StreamSplitter, text: str, size: int) -> list:
    events = []
    for i in range(0, len(text), size):
        events += splitter.feed(text[i : i + size])
    return events + splitter.finish()


def _replay(events: list) -> tuple[str, list[tuple[str, str, str]]]:
    """What a client puts together from the deltas: content, and (id, name, arguments)
    per call index."""
    content, calls = "", {}
    for event in events:
        if event[0] == "content":
            content += event[1]
        elif event[0] == "call":
            assert event[1] == len(calls)  # indexes count up from 0, each opened once
            calls[event[1]] = [event[2], event[3], ""]
        else:
            calls[event[1]][2] += event[2]
    return content, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_the_stream_splitter_gives_the_parsed_calls_at_any_chunking(size) -> None:
    content, calls = _replay(_stream(StreamSplitter(), OUTPUT, size))
    assert content.strip() == "Let me look."
    expected = parse_tool_calls(OUTPUT)[1]
    assert [(name, json.loads(args)) for _, name, args in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in expected
    ]
    assert len({call_id for call_id, _, _ in calls}) == 2
    plain = StreamSplitter()
    text = "a < b, and <tool is not a call"
    assert _replay(_stream(plain, text, size)) == (text, [])


def test_arguments_stream_as_they_are_written() -> None:
    """The call opens once its name is read, and each argument fragment goes out as soon
    as it cannot be the call's own closing brace or tag: a client sees a long call grow."""
    splitter = StreamSplitter()
    assert splitter.feed("<tool_call>\n") == []
    assert splitter.feed('{"name": "get_weather", "arguments": ') == []  # no "{" yet
    opened = splitter.feed('{"city": "Pa')
    assert [e[0] for e in opened] == ["call", "arguments"]
    assert opened[0][1] == 0 and opened[0][3] == "get_weather"
    assert opened[1] == ("arguments", 0, '{"city": "Pa')
    assert splitter.feed('ris"}') == [("arguments", 0, 'ris"')]  # "}" may be the call's
    assert splitter.feed("}") == [("arguments", 0, "}")]  # the first was the arguments'
    assert splitter.feed("\n</tool") == []
    assert splitter.feed("_call>") == []  # the block is done, nothing more to send
    assert splitter.finish() == []
    assert splitter.num_calls == 1


def test_blocks_in_another_order_or_broken_are_decided_when_they_close() -> None:
    other = '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
    content, calls = _replay(_stream(StreamSplitter(), other, 5))
    assert content == "" and [(n, json.loads(a)) for _, n, a in calls] == [("f", {"x": 1})]
    broken = "<tool_call>\nnot json\n</tool_call> after"
    assert _replay(_stream(StreamSplitter(), broken, 4)) == (broken, [])
    unclosed = '<tool_call>\n{"na'
    assert _replay(_stream(StreamSplitter(), unclosed, 3)) == (unclosed, [])


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 3}])
def test_a_constraint_refuses_settings_that_forbid_ending(extra) -> None:
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "structured_outputs": {"regex": "a+"}, **extra}
    )
    with pytest.raises(RequestError, match="constraint"):
        req.sampling(4, None)


LLAMA = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


@pytest.mark.parametrize("size", [1, 4, 100])
def test_llama3_json_calls_parse_for_offered_tools_only(size) -> None:
    names = frozenset({"get_weather"})
    content, calls = parse_tool_calls(LLAMA, names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_tool_calls(LLAMA, frozenset({"other"})) == (LLAMA, [])
    assert parse_tool_calls(LLAMA) == (LLAMA, [])  # without tools it is only text
    content, calls = _replay(_stream(StreamSplitter(names), LLAMA, size))
    assert content == "" and [(n, json.loads(a)) for _, n, a in calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    answer = StreamSplitter(names)  # plain text streams as it comes, even with tools
    assert answer.feed("Sunny ") == [("content", "Sunny ")]
    assert answer.feed('{"name": "get_weather"}') == [("content", '{"name": "get_weather"}')]


def test_every_grpc_constraint_becomes_the_same_constraint() -> None:
    from tessera.proto.tessera.v1 import generate_pb2 as pb
    from tessera.services.gateway import _sampling_params

    for c in KINDS:
        sampling = pb.SamplingParameters()
        if c.kind == "json_object":
            sampling.json_object = True
        elif c.kind == "choice":
            sampling.choice.choices.extend(json.loads(c.spec))
        else:
            setattr(sampling, c.kind, c.spec)
        assert _sampling_params(sampling).constraint == c
    assert _sampling_params(pb.SamplingParameters()).constraint is None
    with pytest.raises(RequestError, match="choice"):
        _sampling_params(pb.SamplingParameters(choice=pb.Choices()))
