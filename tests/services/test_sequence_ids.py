"""A client may reuse a request id as soon as its stream ends; the sequences of the new
request must not share ids with the old one's, or outputs and aborts still on their way
for the old sequences would end the new stream early and leave its sequence running in
the scheduler with nobody to abort it (what the fuzz tests caught under load)."""

from __future__ import annotations

import asyncio

from tessera.common.sampling_params import SamplingParams
from tessera.services.core import GenerationRequest, ServingCore, TokenPrompt
from tests.services.test_openai_front import INFO, FakeEngine


def test_a_reused_request_id_gets_new_sequence_ids():
    async def main() -> None:
        engine = FakeEngine(lambda seq: [])  # the scheduler's answers are late
        core = ServingCore("fake", 8, engine, None, None, INFO)

        def request() -> GenerationRequest:
            params = SamplingParams(n=2, max_tokens=4)
            return GenerationRequest(TokenPrompt((1, 2, 3)), params, request_id="same")

        first = await core.open(request())
        first.close()  # the client is gone; the abort is on its way
        second = await core.open(request())
        assert first.request_id == second.request_id == "same"
        assert not set(first._ids) & set(second._ids)
        assert all(engine.queue_for(sid) is None for sid in first._ids)
        second.close()
        await asyncio.sleep(0)  # the aborts, sent from tasks
        assert sorted(engine.aborted) == sorted(first._ids + second._ids)

    asyncio.run(main())
