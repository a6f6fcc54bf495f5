"""A constrained request survives an executor's death: the restarted executor receives it
as new, with the tokens already streamed, and replays them into a fresh grammar matcher
(executor/grammar.py). Over real processes (a scheduler and its executor child) on the
default model: greedy streams killed mid-generation end with exactly the tokens of an
undisturbed run, and their text validates against the schema (``jsonschema``). Were
the grammar restarted from nothing, the mask after the restart would ask for a new
opening brace and the output would differ or not parse."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest
import zmq

from tessera.common.constraints import Constraint
from tessera.common.plan import SamplingOptions
from tessera.common.registry import resolve_model
from tessera.common.wire import sampling_to_pb
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.tokenizer_svc.tokenizer import Tokenizer
from tests.proctable import wait_gone
from tests.services_internal.test_engine_processes import Gateway
from tests.services_internal.test_executor_recovery import start_engine

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
NUM_SEQS = 4
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
FLAGS = ["--model", MODEL, "--device", "cpu", "--num-kv-blocks", "64",
         "--max-num-seqs", str(NUM_SEQS), "--max-num-batched-tokens", "64",
         "--step-timeout", "60"]  # fmt: skip


def sequences(prefix: str) -> list[pb.AddSequence]:
    sampling = sampling_to_pb(
        SamplingOptions(temperature=0.0, constraint=Constraint.json_schema(SCHEMA))
    )
    return [
        pb.AddSequence(
            request_id=f"{prefix}{i}",
            prompt_token_ids=[(31 * i + 7 * j) % 4000 + 100 for j in range(4 + i)],
            sampling=sampling,
            stop=pb.StopConditions(max_tokens=60),
        )
        for i in range(NUM_SEQS)
    ]


def test_a_killed_executor_replays_the_grammar_of_running_requests(tmp_path) -> None:
    engine = start_engine(tmp_path / "engine", *FLAGS)
    ctx = zmq.Context()
    gateway = Gateway(ctx, engine.address)
    try:
        gateway.status(timeout=120, resend=1.0)
        gateway.add(*sequences("ref"))
        ref = gateway.wait([f"ref{i}" for i in range(NUM_SEQS)], timeout=300)
        tokenizer = Tokenizer.load(resolve_model(MODEL))
        for seq in ref.values():
            assert seq.finish_reason == "stop", seq
            jsonschema.validate(json.loads(tokenizer.decode(seq.tokens)), SCHEMA)

        gateway.add(*sequences("kill"))
        ids = [f"kill{i}" for i in range(NUM_SEQS)]
        gateway.wait_tokens(ids, 3, timeout=120)
        assert not any(gateway.seqs[rid].finished for rid in ids)
        old_pid = engine.executor_pid()
        os.kill(old_pid, signal.SIGKILL)
        got = gateway.wait(ids, timeout=300)
        assert wait_gone(old_pid, timeout=5)
        for i, rid in enumerate(ids):
            assert got[rid].error == "", got[rid].error
            assert got[rid].tokens == ref[f"ref{i}"].tokens, f"{rid}: grammar not replayed"
        assert gateway.status().counters.num_executor_restarts == 1
    finally:
        gateway.close()
        ctx.destroy(linger=0)
        engine.stop()
