"""A sequence resumed on another engine replica (issue 17): an AddSequence with
``resume_output_token_ids`` goes on after those tokens, exactly as the sequence would
have gone on where it started. In-process SchedulerServers over the mirror executor of
tests/scheduler, whose "model" depends on the tokens alone (greedy)."""

from __future__ import annotations

import threading

import pytest
import zmq

from tessera.common.wire import sequence_outputs
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.server import SchedulerServer
from tests.scheduler.mirror_executor import InstantLink

INFO = pb.EngineInfo(model="fake", max_model_len=64, vocab_size=11, block_size=4,
                     num_kv_blocks=32, eos_token_ids=[10])  # fmt: skip
GATEWAY = b"gw"
PROMPT = [1, 2, 3, 4, 5, 6, 7]
MAX_TOKENS = 12


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Replica:
    def __init__(self, ctx: zmq.Context) -> None:
        self.router = ctx.socket(zmq.ROUTER)  # nobody connected; outputs read from the outbox
        self.link = InstantLink(ctx, INFO.block_size)
        config = SchedulerServerConfig(block_size=INFO.block_size, max_waiting=8)
        self.server = SchedulerServer(config, INFO, self.link, self.router, threading.Event())

    def add(self, seq: pb.AddSequence) -> None:
        msg = pb.GatewayMessage(add=pb.AddRequests(sequences=[seq]))
        self.server.handle_message([GATEWAY, msg.SerializeToString()])

    def run(self, max_steps: int = 100) -> tuple[list[pb.SequenceOutput], list[pb.Rejection]]:
        outputs, rejected = [], []
        for _ in range(max_steps):
            for out in self.server.sessions.take_outbox().values():
                outputs.extend(sequence_outputs(out))
                rejected.extend(out.rejected)
            if outputs and outputs[-1].finished or rejected:
                break
            if (plan := self.server.schedule()) is not None:
                self.server.start_step(plan)
                if (result := self.server.finish_step(plan)) is not None:
                    self.server.process_result(plan, result)
        self.server.scheduler.check_invariants()
        return outputs, rejected

    def close(self) -> None:
        self.link.socket.close()
        self.router.close()


def sequence(resume: list[int] = (), max_tokens: int = MAX_TOKENS) -> pb.AddSequence:
    return pb.AddSequence(
        request_id="gw-1/1/0",
        prompt_token_ids=PROMPT,
        sampling=pb.SamplingOptions(top_p=1.0, repetition_penalty=1.0, min_tokens=3,
                                    min_tokens_blocked_ids=[10]),
        stop=pb.StopConditions(max_tokens=max_tokens, min_tokens=3, ignore_eos=True),
        resume_output_token_ids=resume,
    )


def tokens(outputs: list[pb.SequenceOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


@pytest.mark.parametrize("num_streamed", [0, 1, 5, 11])
def test_resumed_sequence_goes_on_exactly(ctx, num_streamed):
    whole, resumed = Replica(ctx), Replica(ctx)
    try:
        whole.add(sequence())
        outputs, _ = whole.run()
        expected = tokens(outputs)
        assert len(expected) == MAX_TOKENS and outputs[-1].finish_reason == "length"

        resumed.add(sequence(expected[:num_streamed]))
        outputs, rejected = resumed.run()
        assert not rejected
        # only the tokens after the streamed ones come back, and they end where the
        # undisturbed run ended: the resumed tokens count toward max_tokens
        assert tokens(outputs) == expected[num_streamed:]
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert outputs[-1].num_output_tokens == MAX_TOKENS
        assert outputs[-1].num_prompt_tokens == len(PROMPT)
    finally:
        whole.close()
        resumed.close()


def test_resume_with_nothing_left_to_generate_is_invalid(ctx):
    replica = Replica(ctx)
    try:
        replica.add(sequence([0] * MAX_TOKENS))
        _, rejected = replica.run()
        assert [r.kind for r in rejected] == ["invalid"]
        assert "leave nothing to generate" in rejected[0].message
        replica.add(sequence([0, 11]))  # outside the vocabulary
        _, rejected = replica.run()
        assert [r.kind for r in rejected] == ["invalid"]
        assert "outside the vocabulary" in rejected[0].message
    finally:
        replica.close()
