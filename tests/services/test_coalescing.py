"""A stream that falls behind the engine gets its queued tokens in fewer messages.

The gateway puts each step's output for a sequence on the request's queue; when
several are waiting by the time the stream reads, they go out as one delta, with
every token and logprob in order and the newest state (finished, reason). Requests
with stop strings read step by step, so that nothing after a stop is ever sent; the
sequences of an n > 1 request never merge with each other.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from tessera.common.sampling_params import SamplingParams
from tessera.common.wire import OutputRow
from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.core import Generation


def output(rid: str, token: int, finished: bool = False) -> OutputRow:
    out = OutputRow(
        rid,
        [token],
        num_prompt_tokens=3,
        num_output_tokens=token,
        new_logprobs=[engine_pb2.TokenLogprob(token_id=token, logprob=-0.1 * token)],
    )
    if finished:
        out.finished, out.finish_reason = True, "length"
    return out


def generation(ids: list[str], params: SamplingParams) -> tuple[Generation, asyncio.Queue]:
    queue: asyncio.Queue = asyncio.Queue()

    async def abort(request_ids):
        pass

    engine = SimpleNamespace(open=lambda _: queue, abort=abort)
    core = SimpleNamespace(engine=engine, tokenizer=None, metrics=None)
    return Generation(core, "req", ids, [1, 2, 3], params, 0.0), queue


async def drain(gen: Generation) -> list:
    return [d async for d in gen.deltas()]


def test_queued_outputs_of_one_sequence_go_out_as_one_delta():
    async def main():
        gen, queue = generation(["s0"], SamplingParams(max_tokens=5))
        for t in (1, 2, 3):
            queue.put_nowait(output("s0", t))
        task = asyncio.ensure_future(drain(gen))
        await asyncio.sleep(0.01)  # the first three are read together
        queue.put_nowait(output("s0", 4))
        await asyncio.sleep(0.01)
        queue.put_nowait(output("s0", 5, finished=True))
        return await task

    deltas = asyncio.run(main())
    assert [d.token_ids for d in deltas] == [[1, 2, 3], [4], [5]]
    assert [[lp.token_id for lp in d.logprobs] for d in deltas] == [[1, 2, 3], [4], [5]]
    assert [d.finish_reason for d in deltas] == [None, None, "length"]
    assert deltas[-1].usage.completion_tokens == 5


def test_outputs_after_the_finishing_one_and_of_other_sequences_are_not_merged():
    async def main():
        gen, queue = generation(["s0", "s1"], SamplingParams(max_tokens=2, n=2))
        for item in (output("s0", 1), output("s0", 2, finished=True), output("s1", 7),
                     output("s1", 8, finished=True)):  # fmt: skip
            queue.put_nowait(item)
        return await drain(gen)

    deltas = asyncio.run(main())
    assert [(d.index, d.token_ids, d.finish_reason) for d in deltas] == [
        (0, [1, 2], "length"),
        (1, [7, 8], "length"),
    ]


def test_a_request_with_stop_strings_reads_one_step_at_a_time():
    async def main():
        gen, queue = generation(["s0"], SamplingParams(max_tokens=3, stop=["x"]))
        for t in (1, 2):
            queue.put_nowait(output("s0", t))
        queue.put_nowait(output("s0", 3, finished=True))
        return await drain(gen)

    assert [d.token_ids for d in asyncio.run(main())] == [[1], [2], [3]]
