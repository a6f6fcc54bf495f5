"""Embed requests in the scheduler: the prompt's prefill shares the batch with generating
requests (chunked under the same budget), no token is generated, the request finishes
with its vector after its last prefill chunk and its blocks go back at once; it never
starts from a cached prefix, but what it computes is cached for others."""

from __future__ import annotations

import pytest

from tessera.common.plan import SamplingOptions, StepResult
from tessera.common.wire import sequence_outputs
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler import Request, RequestRejected, RequestStatus, StopConditions
from tessera.scheduler.messages import request_from_pb
from tessera.scheduler.sessions import GatewaySessions
from tests.scheduler.test_scheduler_core import Harness, make_request, make_scheduler


def embed_request(request_id: str, num_prompt: int, first: int = 0) -> Request:
    base = first or 10 * (ord(request_id[0]) - ord("a") + 1)
    return Request(
        request_id,
        [base + i for i in range(num_prompt)],
        SamplingOptions(),
        StopConditions(max_tokens=1),
        embed=True,
    )


def test_an_embed_request_finishes_after_its_prefill_with_its_vector_and_no_token():
    h = Harness(make_scheduler(num_blocks=8))
    h.add(embed_request("e", 6))
    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"e": 6}
    assert [n.embed for n in plan.new_requests] == [True]
    [out] = outputs
    assert out.finished and out.finish_reason == "stop"
    assert out.new_token_ids == [] and out.num_output_tokens == 0
    assert out.embedding == [6.0, float(sum(range(50, 56)))]  # the mirror's stand-in
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.num_free_blocks == 8  # its blocks went back with the result
    plan, _ = h.step()  # nothing left to run; the executor forgets it with the next plan
    assert plan.is_empty


def test_a_long_embed_prompt_is_chunked_beside_a_decoding_request():
    h = Harness(make_scheduler(num_blocks=16, max_num_batched_tokens=5))
    h.add(make_request("a", 2, max_tokens=6))
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"a": 2}
    h.add(embed_request("e", 11))
    chunks = []
    while h.scheduler.get_request("e") is not None:
        plan, outputs = h.step()
        assert plan.num_scheduled_tokens["a"] == 1  # a decodes every step, in the same batch
        chunks.append(plan.num_scheduled_tokens["e"])
        assert [o.new_token_ids for o in outputs if o.request_id == "a"] != [[]]
    assert chunks == [4, 4, 3]  # the budget left after a's decode
    [done] = [o for o in outputs if o.request_id == "e"]
    assert done.finished and done.embedding == [11.0, float(sum(range(50, 61)))]
    assert h.scheduler.get_request("a").num_output_tokens == 4
    while h.scheduler.has_unfinished_requests():
        h.step()
    assert h.scheduler.num_free_blocks == 16


def test_an_embed_request_never_starts_from_a_cached_prefix_but_caches_for_others():
    h = Harness(make_scheduler(num_blocks=16))
    h.add(make_request("a", 9, max_tokens=1))  # computes and caches two full blocks
    h.step()
    assert h.scheduler.num_cached_blocks == 2
    h.add(embed_request("e", 9, first=10))  # the same prompt
    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"e": 9}  # every position, no hit
    assert plan.new_requests[0].num_computed_tokens == 0
    assert outputs[0].num_cached_tokens == 0 and outputs[0].finished
    h.add(embed_request("f", 13, first=500))
    h.step()
    h.add(Request("h", [500 + i for i in range(13)], SamplingOptions(), StopConditions(2)))
    plan, _ = h.step()
    # h's prompt is f's: f's three full blocks were cached for it
    assert plan.new_requests[-1].num_computed_tokens == 12
    while h.scheduler.has_unfinished_requests():
        h.step()
    assert h.scheduler.num_free_blocks == 16


def test_a_preempted_embed_request_is_recomputed_from_its_first_token():
    h = Harness(make_scheduler(num_blocks=4, max_num_batched_tokens=8, policy="priority"))
    e = embed_request("e", 14)
    e.priority = 5
    h.add(e)
    h.step()  # first chunk: 8 tokens, two blocks
    h.add(make_request("a", 8, max_tokens=1, priority=0))  # its two blocks preempt e
    while h.scheduler.get_request("a") is not None:
        h.step()
    assert e.num_preemptions == 1
    outputs = []
    while h.scheduler.has_unfinished_requests():
        plan, step_outputs = h.step()
        outputs += step_outputs
        for new in plan.new_requests:
            assert new.num_computed_tokens == 0
    assert [o.embedding for o in outputs if o.request_id == "e"] == [
        [14.0, float(sum(range(50, 64)))]
    ]
    assert h.scheduler.num_free_blocks == 4


def test_an_executor_loss_requeues_an_embed_request_from_scratch():
    h = Harness(make_scheduler(num_blocks=8, max_num_batched_tokens=4))
    h.add(embed_request("e", 10))
    h.step()
    assert h.scheduler.requeue_running() == 1
    h.executor.mirrors.clear()  # a new executor knows nothing
    plan = h.scheduler.schedule()
    assert [(n.request_id, n.num_computed_tokens, n.embed) for n in plan.new_requests] == [
        ("e", 0, True)
    ]
    result = h.executor.execute(plan)
    h.scheduler.update_from_result(plan, result)
    while h.scheduler.has_unfinished_requests():
        h.step()
    assert h.scheduler.num_free_blocks == 8


def test_a_result_without_the_embedding_due_breaks_the_mirror_rule():
    s = make_scheduler()
    s.add_request(embed_request("e", 3))
    plan = s.schedule()
    with pytest.raises(RuntimeError, match="returned none"):
        s.update_from_result(plan, StepResult())
    s2 = make_scheduler()
    s2.add_request(embed_request("e", 3))
    plan = s2.schedule()
    with pytest.raises(RuntimeError, match="returned none"):
        s2.update_from_result(plan, StepResult({"e": 1}, {}, {"e": [0.0]}))


def test_an_embed_request_that_would_generate_is_refused():
    s = make_scheduler()
    bad = Request("e", [1, 2], SamplingOptions(), StopConditions(max_tokens=4), embed=True)
    with pytest.raises(RequestRejected, match="generates nothing"):
        s.add_request(bad)


INFO = engine_pb2.EngineInfo(model="m", max_model_len=64, vocab_size=100, block_size=4,
                             num_kv_blocks=16, eos_token_ids=[2], hidden_size=8)


def test_an_embed_sequence_from_the_wire_and_its_output_back():
    seq = engine_pb2.AddSequence(request_id="x", prompt_token_ids=[5, 6, 7], embed=True,
                                 cache_salt="t")
    request = request_from_pb(seq, INFO)
    assert request.embed and request.stop.max_tokens == 1 and request.cache_salt == "t"
    assert request.status is RequestStatus.WAITING
    s = make_scheduler()
    s.add_request(request)
    plan = s.schedule()
    [out] = s.update_from_result(plan, StepResult(embeddings={"x": [0.5, -1.25]}))
    # to the gateway as the scheduler sends it: the step's columns, read back by row
    sessions = GatewaySessions(socket=None)
    sessions.own("x", b"gw")
    sessions.route(out)
    [pb] = sequence_outputs(sessions.take(b"gw"))
    assert pb.finished and pb.finish_reason == "stop" and list(pb.embedding) == [0.5, -1.25]
    assert list(pb.new_token_ids) == [] and pb.num_prompt_tokens == 3
    for wrong in (
        engine_pb2.AddSequence(request_id="y", prompt_token_ids=[5], embed=True,
                               stop=engine_pb2.StopConditions(max_tokens=3)),
        engine_pb2.AddSequence(request_id="y", prompt_token_ids=[5], embed=True,
                               resume_output_token_ids=[6]),
    ):
        with pytest.raises(ValueError, match="embed sequence takes no"):
            request_from_pb(wrong, INFO)
