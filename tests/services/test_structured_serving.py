"""Structured output and tool calling as users meet them: `tessera serve` (real processes)
called through the official openai client and gRPC stubs. Outside references: the
openai client's own ``chat.completions.parse`` (pydantic), the ``jsonschema`` library
for tool arguments, ``re.fullmatch``; hostile constraints get a 400 / INVALID_ARGUMENT
within the time limit while the server keeps serving."""

from __future__ import annotations

import json
import re
import time

import grpc
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tests.services.launch import Server

pytestmark = pytest.mark.slow

LIMIT_S = 5.0  # common/constraints.py COMPILE_TIMEOUT_S
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                   "required": ["zone"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("structured"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population: int = Field(ge=0, le=100_000_000)


def test_parse_returns_a_pydantic_object(client) -> None:
    completion = client.chat.completions.parse(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0.0, max_tokens=80,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert completion.choices[0].finish_reason == "stop"


def test_completions_regex_choice_and_json_object(client) -> None:
    r = client.completions.create(
        model="smollm2-135m-instruct", prompt="A date:", max_tokens=20, temperature=0.0,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    choice = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Sky color?"}],
        max_tokens=10, temperature=0.0,
        extra_body={"structured_outputs": {"choice": ["blue", "green", "red"]}},
    )
    assert choice.choices[0].message.content in {"blue", "green", "red"}
    obj = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "A JSON object"}],
        max_tokens=60, temperature=0.0, response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate(client, tool_choice) -> None:
    names = {"get_weather", "get_time"} if tool_choice == "required" else {"get_time"}
    r = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER, CLOCK],
        tool_choice=tool_choice, parallel_tool_calls=False, temperature=0.0, max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, names)
    # streamed: the same calls, as tool_calls deltas, then finish_reason tool_calls
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER, CLOCK],
        tool_choice=tool_choice, parallel_tool_calls=False, temperature=0.0, max_tokens=80,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call opens it, named
                    assert d.id and d.type == "function" and d.function.name
                entry = calls.setdefault(d.index, {"name": "", "arguments": "", "deltas": 0})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
                entry["deltas"] += bool(d.function.arguments)
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    # the arguments came as they were written, a fragment per step, not in one piece
    assert all(c["deltas"] > 1 for c in calls.values())
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls
    ]


def test_multi_turn_with_a_tool_result(client) -> None:
    first = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER],
        tool_choice="required", temperature=0.0, max_tokens=80,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=history, tools=[WEATHER], temperature=0.0,
        max_tokens=12,
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the turns were rendered


HOSTILE = {
    "1 MB schema": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "x" * 100} for i in range(10_000)}},
    "deep nesting": json.loads('{"type":"object","properties":{"a":' * 100 + '{"type":"string"}'
                               + "}}" * 100),
    "unsatisfiable": {"type": "integer", "minimum": 10, "maximum": 1},
}


def test_hostile_constraints_are_client_errors_and_the_server_keeps_serving(server) -> None:
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        bodies = [{"structured_outputs": {"json": s}} for s in HOSTILE.values()]
        bodies += [{"structured_outputs": {"regex": "[unclosed"}},
                   {"structured_outputs": {"grammar": "root ::= ("}}]
        for extra in bodies:
            started = time.monotonic()
            r = http.post("/v1/completions", json={
                "model": "smollm2-135m-instruct", "prompt": "x", "max_tokens": 4, **extra})
            assert r.status_code == 400, r.text
            assert time.monotonic() - started < LIMIT_S
        # a regex that backtracking engines choke on: bounded here, answered in time
        started = time.monotonic()
        r = http.post("/v1/completions", json={
            "model": "smollm2-135m-instruct", "prompt": "aaaa", "max_tokens": 8,
            "temperature": 0.0, "structured_outputs": {"regex": "(a+)+b"}})
        assert time.monotonic() - started < 60
        assert r.status_code in (200, 400)
        ok = http.post("/v1/completions", json={
            "model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 4})
        assert ok.status_code == 200
    stub = server.stub()
    sampling = pb.SamplingParameters(max_tokens=4, regex="[unclosed")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="x", sampling=sampling)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    sampling = pb.SamplingParameters(max_tokens=8, temperature=0.0,
                                     choice=pb.Choices(choices=["alpha", "beta"]))
    text = "".join(m.text for m in stub.Generate(pb.GenerateRequest(text="x", sampling=sampling)))
    assert text in ("alpha", "beta")
