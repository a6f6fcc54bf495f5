"""Whatever a gateway sends, the scheduler loop raises nothing and loses nothing.

Random GatewayMessages (valid, absurd, and plain bytes) go into an in-process
SchedulerServer whose executor is the mirror executor of tests/scheduler; steps run in
between. Every message must be handled without reaching the loop's last-resort handler
(which logs "handling a ... message failed"), and the queues and the block pool must stay
consistent.
"""

from __future__ import annotations

import logging
import math
import threading

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.common.plan import SamplingOptions
from tessera.common.wire import sampling_from_pb, stop_from_pb
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.messages import check_sampling, request_from_pb
from tessera.scheduler.server import SchedulerServer
from tests.scheduler.mirror_executor import InstantLink

INFO = pb.EngineInfo(model="fake", max_model_len=48, vocab_size=11, block_size=4,
                     num_kv_blocks=16, eos_token_ids=[10])  # fmt: skip


_ids = st.sampled_from(["a", "b", "c", "", "é", "x" * 300])
_u32 = st.integers(0, 2**32 - 1)
_token = st.integers(0, 14) | _u32  # in the vocabulary (11) or not
_float = st.floats(width=32) | st.sampled_from([0.0, 1.0, -1.0, math.inf, math.nan])

# What a gateway sends (valid), and what a broken or hostile one might (wild).
valid_sampling = st.builds(
    pb.SamplingOptions,
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_k=st.integers(0, 11),
    top_p=st.sampled_from([1.0, 0.9]),
    repetition_penalty=st.sampled_from([1.0, 1.2]),
    seed=st.integers(0, 2**64 - 1),
    logprobs=st.integers(0, 3),
    min_tokens=st.integers(0, 2),
    min_tokens_blocked_ids=st.just([10]),
)
wild_sampling = st.builds(
    pb.SamplingOptions,
    temperature=_float,
    top_k=_u32,
    top_p=_float,
    min_p=_float,
    repetition_penalty=_float,
    presence_penalty=_float,
    frequency_penalty=_float,
    seed=st.integers(0, 2**64 - 1),
    logprobs=_u32,
    min_tokens=_u32,
    min_tokens_blocked_ids=st.lists(_token, max_size=3),
    logit_bias_ids=st.lists(_token, max_size=3),
    logit_bias_values=st.lists(_float, max_size=3),
)
valid_stop = st.builds(
    pb.StopConditions,
    max_tokens=st.integers(0, 20),
    min_tokens=st.integers(0, 2),
    stop_token_ids=st.lists(st.integers(0, 10), max_size=2),
    ignore_eos=st.booleans(),
)
wild_stop = st.builds(
    pb.StopConditions,
    max_tokens=_u32,
    min_tokens=_u32,
    stop_token_ids=st.lists(_token, max_size=3),
    ignore_eos=st.booleans(),
)
valid_sequence = st.builds(
    pb.AddSequence,
    request_id=_ids,
    prompt_token_ids=st.lists(st.integers(0, 10), min_size=1, max_size=30),
    sampling=valid_sampling | st.none(),
    stop=valid_stop | st.none(),
    priority=st.integers(-3, 3),
    resume_output_token_ids=st.lists(st.integers(0, 10), max_size=5),  # issue 17
)
wild_sequence = st.builds(
    pb.AddSequence,
    request_id=_ids,
    prompt_token_ids=st.lists(_token, max_size=60),
    sampling=st.one_of(valid_sampling, st.none(), wild_sampling),
    stop=st.one_of(valid_stop, st.none(), wild_stop),
    priority=st.integers(-(2**31), 2**31 - 1),
    resume_output_token_ids=st.lists(_token, max_size=60),
)
_add = st.lists(valid_sequence, min_size=1, max_size=3) | st.lists(
    valid_sequence | wild_sequence, max_size=4
)
message = st.one_of(
    st.builds(lambda s: pb.GatewayMessage(add=pb.AddRequests(sequences=s)), _add),
    st.builds(
        lambda ids: pb.GatewayMessage(abort=pb.AbortRequests(request_ids=ids)),
        st.lists(_ids, max_size=3),
    ),  # fmt: skip
    st.builds(lambda q: pb.GatewayMessage(status=pb.StatusQuery(query_id=q)), _u32),
    st.just(pb.GatewayMessage(goodbye=True)),
    st.just(pb.GatewayMessage()),
)
frames = st.one_of(
    message.map(lambda m: [m.SerializeToString()]),
    message.map(lambda m: [m.SerializeToString()]),
    st.lists(st.binary(max_size=40), min_size=1, max_size=3),
)


@pytest.fixture(scope="module")
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Failures(logging.Handler):
    """Records what the loop's last-resort handler logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "message failed" in record.getMessage():
            trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            self.messages.append(f"{record.getMessage()}\n{trace}")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"gw1", b"gw2"]), frames, st.integers(0, 3)),
                min_size=1, max_size=12))  # fmt: skip
def test_no_message_raises_out_of_the_loop(ctx, inputs):
    router = ctx.socket(zmq.ROUTER)  # nobody connected: replies fail, as to a gone gateway
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    executor = InstantLink(ctx, INFO.block_size)
    config = SchedulerServerConfig(block_size=INFO.block_size, max_waiting=8)
    server = SchedulerServer(config, INFO, executor, router, threading.Event())
    failures = Failures()
    logger = logging.getLogger("tessera.scheduler.server")
    logger.addHandler(failures)
    try:
        for gateway, data, num_steps in inputs:
            server.handle_message([gateway, *data])
            for _ in range(num_steps):
                if (plan := server.schedule()) is not None:
                    server.start_step(plan)
                    if (result := server.finish_step(plan)) is not None:
                        server.process_result(plan, result)
                server.scheduler.check_invariants()
        assert not failures.messages, failures.messages
    finally:
        logger.removeHandler(failures)
        executor.socket.close()
        router.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_sampling | wild_sampling | st.none(), min_size=1, max_size=4))
def test_cached_sampling_options_are_the_ones_converted_each_time(drawn):
    """request_from_pb caches the checked SamplingOptions by the message's bytes: the
    same options (or the same error) as converting and checking every time, for a
    message seen again too."""
    for sampling in [*drawn, *drawn]:
        seq = pb.AddSequence(request_id="a", prompt_token_ids=[1, 2], sampling=sampling)
        try:
            expected = SamplingOptions() if sampling is None else sampling_from_pb(sampling)
            check_sampling(expected, INFO.vocab_size)
        except ValueError as e:
            with pytest.raises(ValueError) as raised:
                request_from_pb(seq, INFO)
            assert str(raised.value) == f"request 'a': {e}"
            continue
        assert request_from_pb(seq, INFO).sampling == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(valid_stop | wild_stop | st.none(), st.integers(1, 60)), min_size=1,
                max_size=4))  # fmt: skip
def test_cached_stop_conditions_are_the_ones_converted_each_time(drawn):
    """The same for the stop conditions, whose unset max_tokens depends on the prompt's
    length (the room it leaves within max_model_len)."""
    for stop, prompt_len in [*drawn, *drawn]:
        seq = pb.AddSequence(request_id="a", prompt_token_ids=[1] * prompt_len, stop=stop)
        room = max(INFO.max_model_len - prompt_len, 1)
        try:
            expected = stop_from_pb(seq.stop, INFO.eos_token_ids, default_max_tokens=room)
        except ValueError as e:
            with pytest.raises(ValueError) as raised:
                request_from_pb(seq, INFO)
            assert str(raised.value) == f"request 'a': {e}"
            continue
        assert request_from_pb(seq, INFO).stop == expected


def test_a_large_sampling_message_is_converted_not_cached():
    plain = pb.SamplingOptions(temperature=0.5, top_p=1.0, repetition_penalty=1.0)
    grammar = pb.SamplingOptions(constraint=pb.Constraint(regex="a" * 5000))
    grammar.MergeFrom(plain)
    seq = pb.AddSequence(request_id="a", prompt_token_ids=[1], sampling=grammar)
    first, second = request_from_pb(seq, INFO).sampling, request_from_pb(seq, INFO).sampling
    assert first == second == sampling_from_pb(grammar) and first is not second
    small = pb.AddSequence(request_id="b", prompt_token_ids=[1], sampling=plain)
    assert request_from_pb(small, INFO).sampling is request_from_pb(small, INFO).sampling
