"""The HTTP front over a scripted engine, in process: how the scheduler's refusals and
failures reach an OpenAI client (status codes, error shape, stream error events), and
what /health and /metrics say when the scheduler is gone. No model, no processes: the
engine answers each AddSequence with the items a test scripts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from tessera.common.wire import OutputRow
from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.core import ServingCore
from tessera.services.engine_client import EngineUnavailable
from tessera.services.metrics import Metrics
from tessera.services.openai_api import create_app

INFO = engine_pb2.EngineInfo(
    model="fake", max_model_len=64, vocab_size=100, block_size=16, num_kv_blocks=8,
    eos_token_ids=[0],
)
Script = Callable[[engine_pb2.AddSequence], list]


class FakeEngine:
    identity = "gw-test"

    def __init__(self, script: Script, up: bool = True) -> None:
        self.script = script
        self.up = up
        self.queues: dict[str, asyncio.Queue] = {}
        self.aborted: list[str] = []

    def open(self, ids: list[str]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.update({i: queue for i in ids})
        return queue

    def queue_for(self, rid: str) -> asyncio.Queue | None:
        return self.queues.get(rid)

    def close_ids(self, ids: list[str]) -> None:
        for i in ids:
            self.queues.pop(i, None)

    async def add(self, seqs: list[engine_pb2.AddSequence]) -> None:
        for seq in seqs:
            for item in self.script(seq):
                self.queues[seq.request_id].put_nowait(item)

    async def abort(self, ids: list[str]) -> None:
        self.aborted.extend(ids)

    async def status(self, timeout: float | None = None) -> engine_pb2.StatusReply:
        if not self.up:
            raise EngineUnavailable("the scheduler did not answer a status query")
        return engine_pb2.StatusReply(info=INFO, load=engine_pb2.EngineLoad(num_kv_blocks_free=8))


def reject(kind: str) -> Script:
    return lambda seq: [engine_pb2.Rejection(request_id=seq.request_id, kind=kind, message="no")]


def fail_after_one_token(seq: engine_pb2.AddSequence) -> list:
    return [
        OutputRow(seq.request_id, [5]),
        OutputRow(seq.request_id, [], finished=True, finish_reason="error", error="step failed"),
    ]


def call(script: Script, method: str, path: str, body: dict | None = None, up: bool = True):
    async def run() -> httpx.Response:
        core = ServingCore("fake", 16, FakeEngine(script, up), None, None, INFO, Metrics())
        app = create_app(core, core.metrics, api_key=None, max_body_bytes=1 << 20)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return await c.request(method, path, json=body)

    return asyncio.run(run())


def completion(stream: bool) -> dict:
    return {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 4, "stream": stream}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "kind, status, code", [("overloaded", 429, "overloaded"), ("unavailable", 503, "unavailable"),
                           ("invalid", 400, None)]
)
def test_scheduler_refusals_map_to_status_before_any_stream(kind, status, code, stream):
    r = call(reject(kind), "POST", "/v1/completions", completion(stream))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"] == "no"
    assert ("Retry-After" in r.headers) == (status in (429, 503))


def test_engine_failure_is_500_or_an_error_event():
    r = call(fail_after_one_token, "POST", "/v1/completions", completion(False))
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "step failed", "type": "server_error", "param": None, "code": None
    }
    r = call(fail_after_one_token, "POST", "/v1/completions", completion(True))
    assert r.status_code == 200  # the first token went out before the failure
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    # No tokenizer: the token carries no text, so no chunk; then the error, then [DONE].
    assert len(events) == 2 and events[-1] == "[DONE]"
    assert json.loads(events[0])["error"]["message"] == "step failed"


def test_health_and_metrics_when_the_scheduler_is_gone():
    r = call(reject("invalid"), "GET", "/health", up=False)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    r = call(reject("invalid"), "GET", "/metrics", up=False)
    assert r.status_code == 200 and "tessera_engine_up 0.0" in r.text
    r = call(reject("invalid"), "GET", "/health")
    assert r.status_code == 200
