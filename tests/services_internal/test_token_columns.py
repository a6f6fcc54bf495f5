"""A step's outputs as columns (engine.proto TokenColumns, issue 22): what the scheduler
queues with TokenColumnsBuilder comes back from the bytes, through
``common.wire.output_rows`` (the gateway's plain rows; ``sequence_outputs`` gives each as
its message), as exactly the SequenceOutputs a message per sequence carried; columns
that disagree are a WireError, never a wrong stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.common.plan import TokenLogprobs
from tessera.common.wire import (
    FINISH_CODES,
    OutputRow,
    TokenColumnsBuilder,
    WireError,
    decode,
    encode,
    logprobs_to_pb,
    output_rows,
    sequence_outputs,
)
from tessera.proto.tessera.v1 import engine_pb2 as pb

_u32 = st.integers(0, 2**32 - 1)
_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
token_logprobs = st.builds(
    TokenLogprobs,
    token_id=_u32,
    logprob=_f32,
    rank=_u32,
    top=st.lists(st.tuples(_u32, _f32), max_size=3).map(tuple),
)


@st.composite
def rows(draw) -> dict:
    """One sequence's output, as the scheduler reports it."""
    tokens = draw(st.lists(_u32, max_size=3))
    reason = draw(st.sampled_from(list(FINISH_CODES)))
    with_logprobs = tokens and draw(st.booleans())
    # an embed sequence's last row: "stop", no token, a vector (of one length per step)
    embedding = (draw(st.lists(_f32, min_size=3, max_size=3))
                 if reason == "stop" and not tokens and draw(st.booleans()) else None)  # fmt: skip
    return {
        "request_id": draw(st.text(max_size=12)),
        "new_token_ids": tokens,
        "finish_reason": reason,
        "num_prompt_tokens": draw(_u32),
        "num_output_tokens": draw(_u32),
        "num_cached_tokens": draw(_u32),
        "stop_token_id": draw(_u32) if reason == "stop" and embedding is None else None,
        "queue_seconds": draw(st.just(0.0) | st.floats(0, 1e6, width=32)),
        "error": draw(st.text(max_size=20)) if reason == "error" else "",
        "error_kind": draw(st.sampled_from(["internal", "unavailable"])) if reason == "error"
        else "",
        "logprobs": draw(st.lists(token_logprobs, min_size=len(tokens), max_size=len(tokens)))
        if with_logprobs else [],
        "embedding": embedding,
    }  # fmt: skip


def expected_output(row: dict) -> pb.SequenceOutput:
    """The SequenceOutput a message of its own carried for this row (before columns)."""
    seq = pb.SequenceOutput(
        request_id=row["request_id"],
        new_token_ids=row["new_token_ids"],
        new_logprobs=[logprobs_to_pb(lp) for lp in row["logprobs"]],
        finished=bool(row["finish_reason"]),
        finish_reason=row["finish_reason"],
        num_prompt_tokens=row["num_prompt_tokens"],
        num_output_tokens=row["num_output_tokens"],
        num_cached_tokens=row["num_cached_tokens"],
        error=row["error"],
        error_kind=row["error_kind"],
        queue_seconds=row["queue_seconds"],
        embedding=row["embedding"] or (),
    )
    if row["stop_token_id"] is not None:
        seq.stop_token_id = row["stop_token_id"]
    return seq


def through_bytes(builder: TokenColumnsBuilder) -> list[pb.SequenceOutput]:
    data = encode(pb.EngineOutputs(tokens=builder.fields()))
    return sequence_outputs(decode(pb.EngineOutputs, data))


@given(st.lists(rows(), max_size=8))
def test_columns_round_trip_to_the_sequence_outputs(drawn):
    builder = TokenColumnsBuilder()
    for row in drawn:
        if row["finish_reason"] or row["queue_seconds"] or row["logprobs"] or row["error"]:
            builder.add(**row)
        else:  # the running row's shortcut must read back the same
            builder.add_tokens(row["request_id"], row["new_token_ids"], row["num_prompt_tokens"],
                               row["num_output_tokens"], row["num_cached_tokens"])  # fmt: skip
    assert len(builder) == len(drawn)
    assert through_bytes(builder) == [expected_output(row) for row in drawn]
    assert builder.to_pb() == pb.EngineOutputs(tokens=builder.fields()).tokens


_token_rows = st.dictionaries(st.text(max_size=12), st.tuples(_u32, _u32, _u32, _u32), max_size=6)


@given(st.lists(rows(), max_size=4), st.lists(_token_rows, max_size=3), st.integers(0, 4))
def test_token_rows_read_back_after_the_other_rows(drawn, chunks, split):
    """add_token_rows, a step's running rows at once, reads back as add_tokens row by
    row would, after every row add() queues, whether added before or after them."""
    builder = TokenColumnsBuilder()
    for row in drawn[:split]:
        builder.add(**row)
    for chunk in chunks:
        builder.add_token_rows(chunk)
    for row in drawn[split:]:
        builder.add(**row)
    running = [
        {**_RUNNING, "request_id": rid, "new_token_ids": [token], "num_prompt_tokens": prompt,
         "num_output_tokens": output, "num_cached_tokens": cached}
        for chunk in chunks
        for rid, (token, prompt, output, cached) in chunk.items()
    ]  # fmt: skip
    assert len(builder) == len(drawn) + len(running)
    assert through_bytes(builder) == [expected_output(row) for row in [*drawn, *running]]


_RUNNING = {"finish_reason": "", "stop_token_id": None, "queue_seconds": 0.0, "error": "",
            "error_kind": "", "logprobs": [], "embedding": None}  # fmt: skip


def test_a_row_has_every_field_of_a_sequence_output_and_converts_to_it():
    fields = set(OutputRow.__dataclass_fields__)
    assert fields == {f.name for f in pb.SequenceOutput.DESCRIPTOR.fields}
    row = OutputRow("r", [4, 5], True, "stop", 3, 2, 16, 0.25, stop_token_id=0)
    message = row.to_pb()
    assert message.HasField("stop_token_id") and message.stop_token_id == 0  # set, as 0
    assert not OutputRow("r", [4]).to_pb().HasField("stop_token_id")
    assert (message.request_id, list(message.new_token_ids), message.num_cached_tokens,
            message.queue_seconds) == ("r", [4, 5], 16, 0.25)  # fmt: skip
    # Read from the bytes, a row holds plain values (a list, a str), not views of a
    # message that every read would convert again.
    builder = TokenColumnsBuilder()
    builder.add_tokens("a", [7], 3, 1, 0)
    data = encode(pb.EngineOutputs(tokens=builder.fields()))
    [read] = output_rows(decode(pb.EngineOutputs, data))
    assert type(read.new_token_ids) is list and type(read.request_id) is str
    assert read == OutputRow("a", [7], False, "", 3, 1, 0, 0.0)


def test_a_message_without_columns_has_no_outputs():
    assert sequence_outputs(pb.EngineOutputs(status=pb.StatusReply(query_id=3))) == []


def test_the_builder_refuses_rows_it_could_not_encode():
    builder = TokenColumnsBuilder()
    with pytest.raises(ValueError, match="finish_reason 'done'"):
        builder.add("a", [1], "done")
    with pytest.raises(ValueError, match="without a stop token id"):
        builder.add("a", [1], "stop")
    with pytest.raises(ValueError, match="2 logprobs for 1 new tokens"):
        builder.add("a", [1], logprobs=[TokenLogprobs(1, -0.1, 1, ())] * 2)


def valid_columns() -> pb.TokenColumns:
    """Four rows: running with a queue time and logprobs, stopped, failed, running."""
    builder = TokenColumnsBuilder()
    lp = TokenLogprobs(7, -0.25, 1, ((7, -0.25), (8, -2.0)))
    builder.add("a", [7, 9], "", 5, 2, 0, queue_seconds=0.5, logprobs=[lp, lp])
    builder.add("b", [2], "stop", 3, 4, 0, stop_token_id=2)
    builder.add("c", [], "error", 3, 1, 0, error="step failed", error_kind="internal")
    builder.add_tokens("d", [11], 6, 1, 4)
    return builder.to_pb()


def test_the_fixture_reads_back():
    outputs = sequence_outputs(pb.EngineOutputs(tokens=valid_columns()))
    assert [o.request_id for o in outputs] == ["a", "b", "c", "d"]
    assert [list(o.new_token_ids) for o in outputs] == [[7, 9], [2], [], [11]]
    assert [o.finish_reason for o in outputs] == ["", "stop", "error", ""]
    assert outputs[0].queue_seconds == 0.5 and len(outputs[0].new_logprobs) == 2
    assert outputs[1].HasField("stop_token_id") and outputs[1].stop_token_id == 2
    assert not outputs[0].HasField("stop_token_id")
    assert (outputs[2].error, outputs[2].error_kind) == ("step failed", "internal")
    assert outputs[3].num_cached_tokens == 4 and not outputs[3].finished


def _drop_last(field: str):
    def mutate(cols: pb.TokenColumns) -> None:
        del getattr(cols, field)[-1]

    return mutate


def _append(field: str, value):
    def mutate(cols: pb.TokenColumns) -> None:
        getattr(cols, field).append(value)

    return mutate


def _set(field: str, values: list):
    def mutate(cols: pb.TokenColumns) -> None:
        del getattr(cols, field)[:]
        getattr(cols, field).extend(values)

    return mutate


def _top_mismatch(cols: pb.TokenColumns) -> None:
    cols.logprobs[0].top_ids.append(3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_last("num_new_tokens"), "3 num_new_tokens for 4 request_ids"),
        (_append("finish_reasons", 0), "5 finish_reasons for 4 request_ids"),
        (_drop_last("num_prompt_tokens"), "num_prompt_tokens for 4"),
        (_drop_last("num_output_tokens"), "num_output_tokens for 4"),
        (_drop_last("num_cached_tokens"), "num_cached_tokens for 4"),
        (_append("new_token_ids", 5), "add up to 4, but 5 new_token_ids"),
        (_set("finish_reasons", [0, 1, 4, 9]), "9 is not a FinishReason"),
        (_set("finish_reasons", [0, 0, 4, 0]), "1 stop_token_ids for 0 stopped rows"),
        (_set("finish_reasons", [0, 1, 0, 0]), "1 errors and 1 error_kinds for 0 failed"),
        (_drop_last("error_kinds"), "1 errors and 0 error_kinds"),
        (_set("queue_rows", [4]), "queue_rows must be ascending rows below 4"),
        (_set("queue_rows", [1, 0]), "queue_rows must be ascending"),
        (_append("queue_seconds", 1.0), "2 queue_seconds for 1 rows"),
        (_set("logprob_rows", [0, 0]), "logprob_rows must be ascending"),
        (_set("logprob_rows", [3]), "2 logprobs for the 1 new tokens"),
        (_drop_last("logprobs"), "1 logprobs for the 2 new tokens"),
        (_top_mismatch, "3 top_ids but 2 top_logprobs"),
    ],
)
def test_columns_that_disagree_are_a_wire_error(mutate, message):
    cols = valid_columns()
    mutate(cols)
    data = encode(pb.EngineOutputs(tokens=cols))
    out = decode(pb.EngineOutputs, data)  # well-formed protobuf: the columns are checked
    with pytest.raises(WireError, match=message):
        sequence_outputs(out)


def embedding_columns() -> pb.TokenColumns:
    """Three rows: an embedding, a stopped generation, an embedding."""
    builder = TokenColumnsBuilder()
    builder.add("e1", [], "stop", 4, 0, 0, embedding=[0.5, -1.0])
    builder.add("g", [2], "stop", 3, 1, 0, stop_token_id=2)
    builder.add("e2", [], "stop", 6, 0, 0, embedding=[0.25, 2.0])
    return builder.to_pb()


def test_embeddings_read_back_on_their_rows_without_a_stop_token():
    outputs = sequence_outputs(pb.EngineOutputs(tokens=embedding_columns()))
    assert [list(o.embedding) for o in outputs] == [[0.5, -1.0], [], [0.25, 2.0]]
    assert [o.HasField("stop_token_id") for o in outputs] == [False, True, False]
    assert outputs[1].stop_token_id == 2
    builder = TokenColumnsBuilder()
    with pytest.raises(ValueError, match="an embedding ends a row with stop"):
        builder.add("e", [], "length", embedding=[1.0])
    builder.add("e", [], "stop", embedding=[1.0, 2.0])
    with pytest.raises(ValueError, match="of 3 floats beside ones of 2"):
        builder.add("f", [], "stop", embedding=[1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_append("embeddings", 1.0), "5 embedding floats for 2 embedding rows"),
        (_set("embedding_rows", [0]), "1 stop_token_ids for 2 stopped rows"),
        (_set("embedding_rows", [2, 0]), "embedding_rows must be ascending"),
        (_set("finish_reasons", [2, 1, 1]), "an embedding row must finish with stop"),
        (_set("embeddings", []), "0 embedding floats for 2 embedding rows"),
    ],
)
def test_embedding_columns_that_disagree_are_a_wire_error(mutate, message):
    cols = embedding_columns()
    mutate(cols)
    out = decode(pb.EngineOutputs, encode(pb.EngineOutputs(tokens=cols)))
    with pytest.raises(WireError, match=message):
        sequence_outputs(out)


def test_the_old_per_sequence_field_is_gone_from_the_wire():
    """A scheduler of the old wire (field 1, one SequenceOutput each) is refused by
    name, not half-read: decode() rejects fields this version does not know."""
    old = pb.SequenceOutput(request_id="a", new_token_ids=[1]).SerializeToString()
    data = b"\x0a" + bytes([len(old)]) + old  # field 1, length-delimited
    with pytest.raises(WireError, match="does not know"):
        decode(pb.EngineOutputs, data)
