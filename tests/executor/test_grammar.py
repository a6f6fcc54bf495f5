"""The executor's grammar state (executor/grammar.py) on the default model's vocabulary:
masks allow exactly the tokens that keep the output valid (checked by decoding them), a
replay from generated tokens reaches the same state as stepping, a complete grammar
allows only EOS, and a constraint that fails to compile allows only EOS (never a crash).
Also the tool prompt a template without tools gets (tokenizer_svc/tool_prompt.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tessera.common.constraints import Constraint
from tessera.common.registry import resolve_model
from tessera.executor.grammar import Grammars
from tessera.tokenizer_svc.server import ChatTurn
from tessera.tokenizer_svc.tokenizer import Tokenizer
from tessera.tokenizer_svc.tool_prompt import tool_messages

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(resolve_model(MODEL))


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(resolve_model(MODEL), tokenizer.vocab_size)


def allowed(mask_row: np.ndarray, vocab: int) -> list[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits).tolist()


def test_masks_allow_only_valid_continuations_and_then_eos(grammars, tokenizer) -> None:
    choices = ["red", "green", "blue"]
    matcher = grammars.start(Constraint.choice(choices), [])
    first = allowed(grammars.bitmask([matcher])[0], grammars.vocab_size)
    assert first and len(first) < 50
    for token in first:  # every allowed token starts some choice
        text = tokenizer.decode([token], skip_special_tokens=False)
        assert any(c.startswith(text) for c in choices), text
    ids = tokenizer.encode("green", add_special_tokens=False)
    for token in ids:
        assert token in allowed(grammars.bitmask([matcher])[0], grammars.vocab_size)
        Grammars.advance(matcher, token)
    end = allowed(grammars.bitmask([matcher])[0], grammars.vocab_size)
    assert set(end) == set(tokenizer.eos_token_ids)


def test_replay_reaches_the_state_of_stepping(grammars, tokenizer) -> None:
    schema = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"], "additionalProperties": False})
    ids = tokenizer.encode('{"a":12', add_special_tokens=False)
    stepped = grammars.start(schema, [])
    for token in ids:
        Grammars.advance(stepped, token)
    replayed = grammars.start(schema, ids)
    assert np.array_equal(grammars.bitmask([stepped]), grammars.bitmask([replayed]))
    allowed_next = allowed(grammars.bitmask([replayed])[0], grammars.vocab_size)
    assert tokenizer.encode("}", add_special_tokens=False)[0] in allowed_next
    assert tokenizer.encode('"', add_special_tokens=False)[0] not in allowed_next


def test_a_constraint_that_fails_to_compile_allows_only_eos(grammars, tokenizer) -> None:
    matcher = grammars.start(Constraint("regex", "[unclosed"), [])
    grammars._vocabulary()  # the EOS ids are known once the vocabulary is
    row = grammars.bitmask([matcher])[0]
    assert set(allowed(row, grammars.vocab_size)) == set(tokenizer.eos_token_ids)


def test_tools_go_into_the_system_turn_of_a_template_without_tools(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    call = [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    turns = [ChatTurn("user", "Weather in Oslo?"),
             ChatTurn("assistant", "", tool_calls_json=json.dumps(call)),
             ChatTurn("tool", "-3C", tool_call_id="c1")]
    assert "tools" not in tokenizer.chat_template  # SmolLM2's plain ChatML
    messages, template_tools = tool_messages(turns, json.dumps(tools), tokenizer.chat_template)
    assert template_tools is None
    text = tokenizer.apply_chat_template(messages, True)
    assert text.count('"name": "get_weather"') == 2  # the listing, and the earlier call
    written = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert f"<tool_call>\n{written}\n</tool_call>" in text
    assert "<tool_response>\n-3C\n</tool_response>" in text
    native, native_tools = tool_messages(turns, json.dumps(tools), "{{ tools }}")
    assert native_tools == tools and native[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Oslo"}
    with pytest.raises(ValueError, match="tools"):
        tool_messages(turns, "{not json", tokenizer.chat_template)


def test_a_batch_of_masks_equals_each_matchers_own(grammars, tokenizer) -> None:
    """Written in place row by row, a batch gives every row the mask its matcher computes
    alone (llguidance's compute_bitmask): matchers in different states, a refused
    constraint and a finished one mixed in."""
    kinds = [
        Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
        Constraint.choice(["red", "green", "blue"]),
        Constraint("regex", r"[0-9]{2,4}-[a-z]+"),
        Constraint("json_object"),
    ]
    prefixes = ['{"a":', "gr", "12", '{"k": "v', ""]
    matchers = []
    for i in range(24):
        matcher = grammars.start(kinds[i % len(kinds)], [])
        for token in tokenizer.encode(prefixes[i % len(prefixes)], add_special_tokens=False):
            if token in allowed(grammars.bitmask([matcher])[0], grammars.vocab_size):
                Grammars.advance(matcher, token)
        matchers.append(matcher)
    matchers[5] = grammars.start(Constraint("regex", "[unclosed"), [])  # refused: only EOS
    done = grammars.start(Constraint.choice(["no"]), [])
    for token in tokenizer.encode("no", add_special_tokens=False):
        Grammars.advance(done, token)
    matchers.append(done)
    pooled = grammars.bitmask(matchers)
    for row, matcher in enumerate(matchers):
        if matcher.is_error():
            expected = set(tokenizer.eos_token_ids)
        else:
            own = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)
            expected = set(allowed(own, grammars.vocab_size))
        assert set(allowed(pooled[row], grammars.vocab_size)) == expected, row
    assert set(allowed(pooled[-1], grammars.vocab_size)) == set(tokenizer.eos_token_ids)
