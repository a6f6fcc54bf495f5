"""The gateway's engine replicas (services.engine_pool, issue 17), against fake
schedulers in this process: requests are routed by prefix, a replica that falls silent
or is restarted has its open sequences resumed on another with the tokens already
streamed (none lost or repeated), and with no other replica the failure reaches the
stream as before. Timeouts are short: each case takes about a second."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time

import pytest
import zmq
import zmq.asyncio

from tessera.common.wire import TokenColumnsBuilder
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.services.engine_client import EngineUnavailable
from tessera.services.engine_pool import (
    EnginePool,
    link_address,
    read_address_file,
    resolve,
    split_addresses,
)
from tessera.services.routing import RoutingPolicy

PULSE = 0.05
SCHEDULER_TIMEOUT = 1.0
INFO = pb.EngineInfo(model="fake", max_model_len=64, vocab_size=100, block_size=4,
                     num_kv_blocks=64, eos_token_ids=[0])  # fmt: skip
PROMPT = list(range(1, 14))  # three full blocks


class FakeScheduler:
    """A ROUTER that answers status queries while told to, records every message, and
    sends the outputs a test asks for to the gateway that added the sequence."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, name: str) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.answering = True
        self.instance_id = name
        self.state = pb.ENGINE_STATE_SERVING
        self.load = pb.EngineLoad()
        self.received: list[pb.GatewayMessage] = []
        self.owner: dict[str, bytes] = {}
        self.reject_kind = ""  # set: every add is rejected with this kind
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            gateway, data = await self.socket.recv_multipart()
            msg = pb.GatewayMessage.FromString(data)
            self.received.append(msg)
            kind = msg.WhichOneof("kind")
            if kind == "add":
                for seq in msg.add.sequences:
                    self.owner[seq.request_id] = gateway
                if self.reject_kind:
                    rejected = [pb.Rejection(request_id=s.request_id, kind=self.reject_kind,
                                             message="no executor")
                                for s in msg.add.sequences]  # fmt: skip
                    await self._send(gateway, pb.EngineOutputs(rejected=rejected))
            if kind == "status" and self.answering:
                reply = pb.StatusReply(
                    query_id=msg.status.query_id, state=self.state, info=INFO, load=self.load,
                    instance_id=self.instance_id,
                )  # fmt: skip
                await self._send(gateway, pb.EngineOutputs(status=reply))

    async def _send(self, gateway: bytes, out: pb.EngineOutputs) -> None:
        await self.socket.send_multipart([gateway, out.SerializeToString()])

    async def emit(self, rid: str, tokens: list[int], finished: bool = False,
                   num_output_tokens: int = 0) -> None:
        columns = TokenColumnsBuilder()
        columns.add(rid, tokens, "length" if finished else "",
                    num_output_tokens=num_output_tokens)  # fmt: skip
        await self._send(self.owner[rid], pb.EngineOutputs(tokens=columns.to_pb()))

    def adds(self) -> list[pb.AddSequence]:
        return [s for m in self.received if m.WhichOneof("kind") == "add"
                for s in m.add.sequences]  # fmt: skip

    def aborts(self) -> list[str]:
        return [r for m in self.received if m.WhichOneof("kind") == "abort"
                for r in m.abort.request_ids]  # fmt: skip

    def close(self) -> None:
        self.task.cancel()
        self.socket.close()


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(test, num_replicas: int = 2, policy: RoutingPolicy = RoutingPolicy.CACHE_AWARE) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            addresses = [f"ipc://{tmp}/scheduler-{i}.sock" for i in range(num_replicas)]
            ctx = zmq.asyncio.Context()
            fakes = [FakeScheduler(ctx, a, f"s{i}") for i, a in enumerate(addresses)]
            pool = EnginePool(
                ",".join(addresses), policy, heartbeat_timeout=4.0,
                scheduler_timeout=SCHEDULER_TIMEOUT, pulse_interval=PULSE,
            )  # fmt: skip
            await pool.start()
            try:
                await until(lambda: all(c.serving for c in pool.clients))
                await test(fakes, pool)
            finally:
                for fake in fakes:
                    fake.close()
                await pool.close()
                ctx.term()

    asyncio.run(main())


def seq(rid: str, prompt: list[int] = PROMPT, salt: str = "") -> pb.AddSequence:
    return pb.AddSequence(request_id=rid, prompt_token_ids=prompt,
                          stop=pb.StopConditions(max_tokens=8), cache_salt=salt)  # fmt: skip


async def start(pool: EnginePool, rid: str, **kwargs) -> asyncio.Queue:
    queue = pool.open([rid])
    await pool.add([seq(rid, **kwargs)])
    return queue


async def drain(queue: asyncio.Queue) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(queue.get(), 5)
        items.append(item)
        if isinstance(item, pb.Rejection) or item.finished:
            return items


def test_requests_with_one_prefix_go_to_one_replica():
    async def check(fakes, pool):
        await start(pool, "a/0")
        await start(pool, "b/0", prompt=[50] * 13)  # another prefix: the idle replica
        await start(pool, "c/0", prompt=PROMPT[:12] + [99])  # a's prefix: with it
        await start(pool, "d/0", salt="tenant")  # a's tokens, another namespace
        await until(lambda: len(fakes[0].adds()) + len(fakes[1].adds()) == 4)
        on = {s.request_id: i for i, f in enumerate(fakes) for s in f.adds()}
        assert on == {"a/0": 0, "b/0": 1, "c/0": 0, "d/0": 1}
        assert [v.num_routed for v in pool.replicas()] == [2, 2]
        assert [v.num_open for v in pool.replicas()] == [2, 2]

    run(check)


def test_a_silent_replica_s_streams_resume_on_another_without_loss_or_repeat():
    async def check(fakes, pool):
        queue = await start(pool, "a/0")
        await until(lambda: fakes[0].adds())
        await fakes[0].emit("a/0", [5, 6])
        await fakes[0].emit("a/0", [7])
        first = [await asyncio.wait_for(queue.get(), 2) for _ in range(2)]
        fakes[0].answering = False  # hung, or its host gone
        await until(lambda: fakes[1].adds(), timeout=SCHEDULER_TIMEOUT + 2)
        resumed = fakes[1].adds()[0]
        assert resumed.request_id == "a/0" and list(resumed.prompt_token_ids) == PROMPT
        assert list(resumed.resume_output_token_ids) == [5, 6, 7]
        assert resumed.stop.max_tokens == 8  # the original stop conditions
        assert not pool.replicas()[0].serving and pool.lost_reason is None
        await fakes[1].emit("a/0", [8, 9], finished=True, num_output_tokens=5)
        rest = await drain(queue)
        got = [t for item in first + rest for t in item.new_token_ids]
        assert got == [5, 6, 7, 8, 9]  # no token lost or repeated, no error on the way
        assert rest[-1].finished and rest[-1].finish_reason == "length"
        assert [v.num_resumed for v in pool.replicas()] == [0, 1]
        assert [v.num_open for v in pool.replicas()] == [0, 0]
        # new requests avoid the lost replica; once it answers again, it is asked to
        # drop what it was running
        await start(pool, "b/0")
        await until(lambda: len(fakes[1].adds()) == 2)
        assert [s.request_id for s in fakes[1].adds()] == ["a/0", "b/0"]
        fakes[0].answering = True
        await until(lambda: "a/0" in fakes[0].aborts())
        await until(lambda: pool.replicas()[0].serving)

    run(check)


def test_a_restarted_replica_s_streams_resume_elsewhere():
    async def check(fakes, pool):
        queue = await start(pool, "a/0")
        await until(lambda: fakes[0].adds())
        await fakes[0].emit("a/0", [5])
        assert (await asyncio.wait_for(queue.get(), 2)).new_token_ids == [5]
        fakes[0].instance_id = "s0-again"  # a new process: the old one's work is gone
        await until(lambda: fakes[1].adds())
        assert list(fakes[1].adds()[0].resume_output_token_ids) == [5]
        await fakes[1].emit("a/0", [6], finished=True)
        assert [t for i in await drain(queue) for t in i.new_token_ids] == [6]

    run(check)


def test_unavailable_rejection_goes_to_another_replica():
    async def check(fakes, pool):
        fakes[0].reject_kind = "unavailable"  # answers, but its executor cannot start
        queue = await start(pool, "a/0")
        await until(lambda: fakes[1].adds())
        assert not fakes[1].adds()[0].resume_output_token_ids
        await fakes[1].emit("a/0", [4], finished=True)
        assert [t for i in await drain(queue) for t in i.new_token_ids] == [4]

    run(check)


def test_with_no_other_replica_the_failure_reaches_the_stream():
    async def check(fakes, pool):
        queue = await start(pool, "a/0")
        await until(lambda: fakes[0].adds())
        await fakes[0].emit("a/0", [5])
        fakes[0].answering = False
        items = await drain(queue)
        assert items[-1].finish_reason == "error" and items[-1].error_kind == "unavailable"
        assert pool.lost_reason is not None
        with pytest.raises(EngineUnavailable):
            await start(pool, "b/0")

    run(check, num_replicas=1)


def test_aborts_reach_the_replica_that_runs_the_sequence():
    async def check(fakes, pool):
        await start(pool, "a/0")
        await until(lambda: fakes[0].adds())
        await pool.abort(["a/0"])
        await until(lambda: fakes[0].aborts())
        assert fakes[0].aborts() == ["a/0"] and not fakes[1].aborts()
        pool.close_ids(["a/0"])
        await pool.abort(["a/0"])  # closed first (the core's order): every replica
        await until(lambda: fakes[1].aborts())
        assert pool.replicas()[0].num_open == 0

    run(check)


def test_status_sums_the_replicas():
    async def check(fakes, pool):
        fakes[0].load = pb.EngineLoad(num_running=2, num_waiting=1, num_waiting_tokens=30)
        fakes[1].load = pb.EngineLoad(num_running=3, num_kv_blocks_used=7)
        reply = await pool.status()
        assert (reply.load.num_running, reply.load.num_waiting) == (5, 1)
        assert reply.load.num_kv_blocks_used == 7 and reply.load.num_waiting_tokens == 30
        assert reply.info.num_kv_blocks == 2 * INFO.num_kv_blocks
        assert reply.state == pb.ENGINE_STATE_SERVING
        fakes[1].state = pb.ENGINE_STATE_RECOVERING
        await until(lambda: not pool.replicas()[1].serving)
        assert pool.serving and (await pool.status()).state == pb.ENGINE_STATE_SERVING
        # least loaded now: the recovering replica is skipped while another serves
        await start(pool, "x/0", prompt=[60] * 13)
        await until(lambda: fakes[0].adds())
        assert not fakes[1].adds()

    run(check, policy=RoutingPolicy.LEAST_LOADED)


def test_addresses_and_dns_names():
    assert split_addresses(" ipc:///a.sock, tcp://10.0.0.1:5557 ,") == [
        "ipc:///a.sock", "tcp://10.0.0.1:5557"]
    with pytest.raises(ValueError, match="names no scheduler"):
        split_addresses(" , ")
    assert link_address("dns://engine:5557") == "tcp://engine:5557"
    assert link_address("dns:///engine:5557") == "tcp://engine:5557"
    ips = {i[4][0] for i in socket.getaddrinfo("localhost", 5557, type=socket.SOCK_STREAM)}
    expected = sorted(f"tcp://[{ip}]:5557" if ":" in ip else f"tcp://{ip}:5557" for ip in ips)
    found = asyncio.run(resolve(["dns://localhost:5557", "ipc:///a.sock"]))
    assert found == expected + ["ipc:///a.sock"] and "tcp://127.0.0.1:5557" in found
    assert asyncio.run(resolve(["dns://no-such-host.invalid:5557"])) == []


def test_a_replica_list_in_a_file_is_followed_and_what_leaves_it_is_resumed(tmp_path):
    """file:PATH (tessera serve --cluster ray): replicas join as the file lists them; one
    the file drops is retired and its stream goes on elsewhere with no token lost."""
    listing = tmp_path / "replicas"
    addresses = [f"ipc://{tmp_path}/scheduler-{i}.sock" for i in range(2)]

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        fakes = [FakeScheduler(ctx, a, f"s{i}") for i, a in enumerate(addresses)]
        # a replica beyond this machine without CURVE keys is never linked to
        listing.write_text(f"# replicas\n{addresses[0]}\n\ntcp://192.0.2.1:5557\n")
        pool = EnginePool(f"file:{listing}", RoutingPolicy.CACHE_AWARE, heartbeat_timeout=4.0,
                          scheduler_timeout=SCHEDULER_TIMEOUT, pulse_interval=PULSE)
        await pool.start()
        try:
            assert pool.addresses == [addresses[0]]
            await until(lambda: pool.serving)
            queue = await start(pool, "a/0")
            await until(lambda: fakes[0].adds())
            await fakes[0].emit("a/0", [5, 6])
            assert (await asyncio.wait_for(queue.get(), 2)).new_token_ids == [5, 6]
            listing.write_text(f"{addresses[0]}\n{addresses[1]}\n")
            await until(lambda: len(pool.replicas()) == 2 and all(
                v.serving for v in pool.replicas()), timeout=3)
            listing.write_text(f"{addresses[1]}\n")  # replica 0 is gone (re-created)
            await until(lambda: fakes[1].adds(), timeout=3)
            resumed = fakes[1].adds()[0]
            assert resumed.request_id == "a/0" and list(resumed.resume_output_token_ids) == [5, 6]
            assert [v.address for v in pool.replicas()] == [addresses[1]]
            await fakes[1].emit("a/0", [7], finished=True, num_output_tokens=3)
            assert [t for i in await drain(queue) for t in i.new_token_ids] == [7]
            await start(pool, "b/0")  # new requests go to the listed replica only
            await until(lambda: len(fakes[1].adds()) == 2)
            assert [s.request_id for s in fakes[0].adds()] == ["a/0"]
            # listed again (a replica re-created on the same address): a new link
            listing.write_text(f"{addresses[1]}\n{addresses[0]}\n")
            await until(lambda: [v.address for v in pool.replicas()] == addresses[::-1],
                        timeout=3)
            await until(lambda: all(v.serving for v in pool.replicas()))
        finally:
            for fake in fakes:
                fake.close()
            await pool.close()
            ctx.term()

    asyncio.run(main())
    assert read_address_file(str(tmp_path / "missing")) == []


def test_a_file_listing_none_retires_its_replicas_and_a_named_one_stays(tmp_path):
    listing = tmp_path / "replicas"
    addresses = [f"ipc://{tmp_path}/scheduler-{i}.sock" for i in range(2)]

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        fakes = [FakeScheduler(ctx, a, f"s{i}") for i, a in enumerate(addresses)]
        listing.write_text(f"{addresses[0]}\n")
        pool = EnginePool(f"file:{listing},{addresses[1]}", heartbeat_timeout=4.0,
                          scheduler_timeout=SCHEDULER_TIMEOUT, pulse_interval=PULSE)
        await pool.start()
        try:
            await until(lambda: all(v.serving for v in pool.replicas()))
            assert [v.address for v in pool.replicas()] == addresses
            listing.write_text("")  # the file lists none; the named one stays
            await until(lambda: [v.address for v in pool.replicas()] == addresses[1:], 3)
            await asyncio.sleep(1.5)
            assert [v.address for v in pool.replicas()] == addresses[1:] and pool.serving
        finally:
            for fake in fakes:
                fake.close()
            await pool.close()
            ctx.term()

    asyncio.run(main())


def test_metrics_show_each_replica():
    from tessera.services.engine_pool import ReplicaView
    from tessera.services.metrics import Metrics

    reply = pb.StatusReply(load=pb.EngineLoad(num_running=3, num_waiting=2,
                                              num_waiting_tokens=70))  # fmt: skip
    views = [
        ReplicaView("ipc:///r0.sock", True, "", reply, num_open=4, num_routed=9, num_resumed=0),
        ReplicaView("ipc:///r1.sock", False, "lost", None, num_open=0, num_routed=5,
                    num_resumed=2),
    ]
    metrics = Metrics()
    metrics.track_replicas(lambda: views)
    text = metrics.render(None).decode()
    for line in (
        'tessera_replica_up{replica="ipc:///r0.sock"} 1.0',
        'tessera_replica_up{replica="ipc:///r1.sock"} 0.0',
        'tessera_replica_open_sequences{replica="ipc:///r0.sock"} 4.0',
        'tessera_replica_requests_running{replica="ipc:///r0.sock"} 3.0',
        'tessera_replica_waiting_tokens{replica="ipc:///r0.sock"} 70.0',
        'tessera_replica_routed_requests_total{replica="ipc:///r1.sock"} 5.0',
        'tessera_replica_resumed_sequences_total{replica="ipc:///r1.sock"} 2.0',
        'tessera_replica_requests_waiting{replica="ipc:///r1.sock"} 0.0',
    ):
        assert line in text.splitlines(), line
