"""Two engine replicas behind one gateway (issue 17): `tessera serve --replicas 2`.

32 concurrent streams (greedy, and a few seeded ones) are routed over both replicas;
one replica's scheduler is SIGKILLed mid-stream (its executor dies with it). The
gateway resumes that replica's streams on the other by recompute from the prompt plus
the tokens already streamed, so every stream completes with exactly the tokens of one
engine alone (the offline engine, itself checked against transformers), and the
launcher brings the killed replica back. No process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest

from tessera import LLM, SamplingParams
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tests.proctable import cmdline, descendants, pid_alive, wait_gone
from tests.services.launch import PROMPTS, Server

pytestmark = pytest.mark.slow

NUM_STREAMS = 32
NUM_SEEDED = 4  # the last streams sample with a seed; the rest are greedy
SCHEDULER_TIMEOUT = 2.0  # the gateway's: a silent replica's streams move after this


def params(i: int) -> SamplingParams:
    if i >= NUM_STREAMS - NUM_SEEDED:
        return SamplingParams(temperature=0.8, top_k=40, seed=1000 + i, max_tokens=40,
                              ignore_eos=True)  # fmt: skip
    return SamplingParams(temperature=0.0, max_tokens=32 + i % 9, ignore_eos=True)


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))


def request(i: int) -> pb.GenerateRequest:
    p = params(i)
    sampling = pb.SamplingParameters(temperature=p.temperature, max_tokens=p.max_tokens,
                                     ignore_eos=True)  # fmt: skip
    if p.seed is not None:
        sampling.seed, sampling.top_k = p.seed, p.top_k
    return pb.GenerateRequest(text=prompt(i), sampling=sampling)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    llm = LLM("smollm2-135m-instruct", device="cpu", show_progress=False)
    prompts = [prompt(i) for i in range(NUM_STREAMS)]
    outs = llm.generate(prompts, [params(i) for i in range(NUM_STREAMS)], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def schedulers(server: Server) -> dict[str, int]:
    """The live scheduler processes by replica name (scheduler-0, scheduler-1)."""
    found = {}
    for pid in descendants(server.proc.pid):
        line = cmdline(pid)
        if "-m tessera.scheduler " in line and pid_alive(pid):
            name = line.split("--gateway-address ")[1].split()[0].rsplit("/", 1)[1]
            found[name.removesuffix(".sock")] = pid
    return found


def replicas(server: Server) -> list[pb.ReplicaLoad]:
    return list(server.stub().GetLoad(pb.GetLoadRequest(), timeout=5).replicas)


def test_two_replicas_one_killed_mid_stream_every_stream_token_exact(tmp_path, expected):
    # generation_config none: the seeded streams leave top_p unset, which the served
    # default model would otherwise fill from its sampling defaults (top_p 0.9), unlike
    # the offline reference.
    server = Server(tmp_path, replicas=2, max_num_seqs=32, generation_config="none",
                    env={"TESSERA_SCHEDULER_TIMEOUT": str(SCHEDULER_TIMEOUT)})  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not all(r.serving for r in replicas(server)):  # both up before routing
            assert time.monotonic() < deadline, replicas(server)
            time.sleep(0.5)
        assert len(replicas(server)) == 2
        victim_name = "scheduler-1"
        victim = schedulers(server)[victim_name]
        victim_executor = descendants(victim)
        tokens: list[list[int]] = [[] for _ in range(NUM_STREAMS)]
        errors: list[str] = []
        killed = {}

        async def one(stub, i: int) -> None:
            try:
                async for msg in stub.Generate(request(i)):
                    tokens[i].extend(msg.token_ids)
            except grpc.aio.AioRpcError as e:
                errors.append(f"stream {i}: {e.code()} {e.details()}")

        async def main() -> None:
            async with grpc.aio.insecure_channel(server.target) as ch:
                stub = pb_grpc.TesseraStub(ch)
                tasks = [asyncio.create_task(one(stub, i)) for i in range(NUM_STREAMS)]
                deadline = time.monotonic() + 120
                while not all(len(t) >= 2 for t in tokens):
                    assert time.monotonic() < deadline, "the streams did not start"
                    assert not any(t.done() for t in tasks), "a stream ended too early"
                    await asyncio.sleep(0.02)
                killed["load"] = replicas(server)
                os.kill(victim, signal.SIGKILL)
                killed["at"] = time.monotonic()
                killed["tokens"] = [len(t) for t in tokens]
                await asyncio.gather(*tasks)

        asyncio.run(main())
        assert not errors, errors
        # both replicas ran streams when the kill came, and some were cut short by it
        open_at_kill = [r.num_open for r in killed["load"]]
        assert all(n > 0 for n in open_at_kill), open_at_kill
        assert sum(open_at_kill) == NUM_STREAMS
        for i in range(NUM_STREAMS):
            assert tokens[i] == expected[i], f"stream {i}: tokens lost, repeated or changed"
            assert killed["tokens"][i] < len(expected[i]), f"stream {i} ended before the kill"
        after = replicas(server)
        assert after[1].num_resumed == 0 and after[0].num_resumed == open_at_kill[1]
        assert [r.num_open for r in after] == [0, 0]
        # /metrics shows each replica; the killed one is down until its restart serves
        metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        resumed = [line for line in metrics.splitlines()
                   if line.startswith("tessera_replica_resumed_sequences_total{")]  # fmt: skip
        assert [float(line.split()[-1]) for line in resumed] == [open_at_kill[1], 0.0]
        assert "scheduler-0.sock" in resumed[0] and "scheduler-1.sock" in resumed[1]
        # the killed scheduler is reaped with its executor; the launcher starts it again
        assert wait_gone(victim, 5) and all(wait_gone(p, 10) for p in victim_executor)
        deadline = time.monotonic() + 120
        while schedulers(server).get(victim_name) in (None, victim):
            assert time.monotonic() < deadline, "the killed replica was not restarted"
            time.sleep(0.2)
    finally:
        launcher = server.proc.pid
        tree = descendants(launcher)
        server.stop()
    assert server.proc.returncode == 0
    left = [pid for pid in tree + descendants(launcher) if pid_alive(pid)]
    assert not left, [cmdline(p) for p in left]
