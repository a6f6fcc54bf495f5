"""CURVE on the internal ZeroMQ links: a real scheduler process (``--no-start-executor``)
with keys, bound on loopback TCP (configured keys turn CURVE on for every TCP link, so
no override flag is needed to test it here), a fake executor and gateways in this
process. Peers with an unauthorized key, no key, or the wrong server key get nothing
read and nothing served; the authorized ones run a request end to end. The rules that
refuse a link beyond loopback without keys are checked on the three configs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from tessera.common.curve import ClientKeys, ServerKeys, is_local, load_key_pair, write_key_pair
from tessera.common.executor_config import ExecutorServerConfig
from tessera.common.plan import StepResult
from tessera.common.wire import decode, encode, plan_from_pb, result_to_pb
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tessera.services.engine_client import EngineClient, EngineUnavailable
from tessera.services.gateway import GatewayConfig

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GOOD = pb.EngineInfo(model="fake", max_model_len=64, vocab_size=100, block_size=16,
                     num_kv_blocks=16, eos_token_ids=[0])  # fmt: skip
ROGUE = pb.EngineInfo(model="rogue", max_model_len=64, vocab_size=100, block_size=16,
                      num_kv_blocks=8, eos_token_ids=[0])  # fmt: skip
SAMPLED = 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the rules, on the configs ----------------------------------------------------------


@pytest.mark.parametrize("address, local", [
    ("ipc:///tmp/x.sock", True), ("inproc://x", True), ("tcp://127.0.0.1:5557", True),
    ("tcp://127.0.0.2:5557", True), ("tcp://[::1]:5557", True), ("tcp://localhost:5557", True),
    ("tcp://:5557", True), ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False),
    ("tcp://[::]:5557", False), ("tcp://10.0.0.7:5557", False), ("tcp://scheduler:5557", False),
    ("tcp://127.0.0.1:1;10.0.0.7:5557", False), ("ws://127.0.0.1:5557", False),
])  # fmt: skip
def test_what_counts_as_local(address, local):
    assert is_local(address) is local


def test_links_beyond_loopback_need_keys():
    with pytest.raises(ValueError, match="--curve-secret-key-file and --curve-authorized-keys"):
        SchedulerServerConfig(gateway_address="tcp://0.0.0.0:5557")
    with pytest.raises(ValueError, match="CURVE keys"):
        SchedulerServerConfig(executor_address="tcp://10.1.2.3:5558")
    with pytest.raises(ValueError, match="--curve-server-key-file"):
        GatewayConfig(scheduler_address="tcp://scheduler:5557")
    with pytest.raises(ValueError, match="--curve-server-key-file"):
        ExecutorServerConfig(executor_address="tcp://scheduler:5558")
    with pytest.raises(ValueError, match="set both or neither"):
        GatewayConfig(curve_secret_key_file="/k/gateway.key_secret")
    # loopback and ipc need none; with keys, anything goes
    SchedulerServerConfig(gateway_address="tcp://127.0.0.1:5557", executor_address="ipc:///x")
    SchedulerServerConfig(gateway_address="tcp://0.0.0.0:5557", executor_address="tcp://*:5558",
                          curve_secret_key_file="s", curve_authorized_keys="d")
    GatewayConfig(scheduler_address="tcp://scheduler:5557", curve_secret_key_file="g",
                  curve_server_key_file="s")


def test_bad_key_files_are_named(tmp_path):
    write_key_pair(str(tmp_path), "a")
    with pytest.raises(ValueError, match="no secret key"):
        load_key_pair(str(tmp_path / "a.key"))
    with pytest.raises(ValueError, match="cannot read the CURVE key file"):
        ServerKeys.load(str(tmp_path / "missing.key_secret"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no public keys"):
        ServerKeys.load(str(tmp_path / "a.key_secret"), str(tmp_path / "empty"))
    assert oct((tmp_path / "a.key_secret").stat().st_mode & 0o777) == "0o600"
    assert not write_key_pair(str(tmp_path), "a")  # kept, not replaced


# -- a scheduler process with keys ---------------------------------------------------------


class FakeExecutor(threading.Thread):
    """Connects with ``keys``, sends ExecutorReady(info), then samples SAMPLED for
    every scheduled request, step after step."""

    def __init__(self, ctx: zmq.Context, address: str, keys: ClientKeys | None,
                 info: pb.EngineInfo) -> None:
        super().__init__(daemon=True)
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.secure(self.socket, address)
        self.socket.connect(address)
        self.socket.send(encode(pb.ExecutorReady(info=info)))
        self.num_steps = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.socket.poll(100):
                continue
            plan_pb = decode(pb.StepPlan, self.socket.recv())
            plan = plan_from_pb(plan_pb)
            sampled = {rid: SAMPLED for rid in plan.num_scheduled_tokens}
            self.socket.send(encode(result_to_pb(StepResult(sampled), plan_pb.step_id)))
            self.num_steps += 1

    def close(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(5)
        self.socket.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    for directory, name in (("server", "scheduler"), ("clients", "gateway"),
                            ("clients", "executor"), ("rogue", "rogue")):
        write_key_pair(str(root / directory), name)

    def client(name: str, directory: str = "clients", server: str = "server/scheduler.key"):
        return ClientKeys.load(str(root / directory / f"{name}.key_secret"), str(root / server))

    return {
        "root": root,
        "gateway": client("gateway"),
        "executor": client("executor"),
        "rogue": client("rogue", "rogue"),
        # an authorized client that trusts the wrong server key
        "misled": client("gateway", server="rogue/rogue.key"),
    }


@pytest.fixture(scope="module")
def engine(keys, tmp_path_factory):
    """(scheduler process, gateway address, executor address, its log, the fake executor)."""
    root = keys["root"]
    gateway_address = f"tcp://127.0.0.1:{free_port()}"
    executor_address = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("curve-log") / "scheduler.log"
    cmd = [
        sys.executable, "-P", "-m", "tessera.scheduler", "--no-start-executor",
        "--gateway-address", gateway_address, "--executor-address", executor_address,
        "--curve-secret-key-file", str(root / "server" / "scheduler.key_secret"),
        "--curve-authorized-keys", str(root / "clients"),
        "--block-size", "16", "--executor-start-timeout", "60",
    ]  # fmt: skip
    env = dict(os.environ, TESSERA_LOG_LEVEL="INFO")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    executors = []
    try:
        # Impostors first: one with a key the scheduler does not know, one with none.
        # Had either got through, the scheduler would size its pool from ROGUE.
        for impostor_keys in (keys["rogue"], None):
            executors.append(FakeExecutor(ctx, executor_address, impostor_keys, ROGUE))
        time.sleep(1.5)
        assert proc.poll() is None, log.read_text()
        good = FakeExecutor(ctx, executor_address, keys["executor"], GOOD)
        executors.append(good)
        good.start()
        yield proc, gateway_address, executor_address, log, good
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for e in executors:
            e.close()
        ctx.destroy(linger=0)


async def _status(address: str, curve: ClientKeys | None, timeout: float) -> pb.StatusReply:
    """The scheduler's status, asked until ``timeout`` (a link still in its handshake,
    or one that never completes it, refuses sends)."""
    client = EngineClient(address, curve=curve)
    client.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                return await asyncio.wait_for(client.status(timeout=left), left)
            except (EngineUnavailable, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.close()


async def _generate(address: str, curve: ClientKeys) -> list[pb.SequenceOutput]:
    await _status(address, curve, timeout=30)
    client = EngineClient(address, curve=curve)
    client.start()
    try:
        await asyncio.sleep(0.5)  # the handshake
        queue = client.open(["gw/r1/0"])
        await client.add([pb.AddSequence(
            request_id="gw/r1/0", prompt_token_ids=[1, 2, 3],
            stop=pb.StopConditions(max_tokens=2, ignore_eos=True), cache_salt="tenant-a",
        )])  # fmt: skip
        outputs = []
        while not (outputs and outputs[-1].finished):
            outputs.append(await asyncio.wait_for(queue.get(), 30))
        return outputs
    finally:
        await client.close()


def test_authorized_gateway_and_executor_serve_a_request(engine, keys):
    proc, address, _, log, good = engine
    status = asyncio.run(_status(address, keys["gateway"], timeout=30))
    assert status.info == GOOD  # the impostor executors were never read
    assert status.state == pb.ENGINE_STATE_SERVING
    outputs = asyncio.run(_generate(address, keys["gateway"]))
    assert [t for o in outputs for t in o.new_token_ids] == [SAMPLED, SAMPLED]
    assert outputs[-1].finish_reason == "length" and good.num_steps >= 2


def _ask_status(address: str, keys: ClientKeys | None) -> pb.EngineOutputs | None:
    """A status query from a bare DEALER: the reply, or None if nothing came."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    try:
        if keys is not None:
            keys.secure(sock, address)
        sock.connect(address)
        query = pb.GatewayMessage(status=pb.StatusQuery(query_id=1))
        try:
            sock.send(query.SerializeToString())
        except zmq.Again:  # no peer ever completed the handshake
            return None
        return decode(pb.EngineOutputs, sock.recv()) if sock.poll(2000) else None
    finally:
        sock.close()
        ctx.term()


@pytest.mark.parametrize("who", ["gateway", "rogue", "plain", "misled"])
def test_only_gateways_with_the_right_keys_get_answers(engine, keys, who):
    """rogue: a key the scheduler does not know; plain: no CURVE; misled: the right
    client key, but the wrong server key (the client refuses the real scheduler)."""
    _, address, _, _, _ = engine
    reply = _ask_status(address, None if who == "plain" else keys[who])
    if who == "gateway":
        assert reply is not None and reply.status.info == GOOD
    else:
        assert reply is None


def test_refused_connections_do_not_pass_for_a_lost_executor(engine, keys):
    """A port scan or an impostor at the executor socket fails its handshake and goes:
    the scheduler must not take that drop for its executor's."""
    proc, address, executor_address, log, _ = engine
    asyncio.run(_status(address, keys["gateway"], timeout=30))  # serving
    ctx = zmq.Context()
    try:
        port = int(executor_address.rpartition(":")[2])
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port)).close()
            impostor = FakeExecutor(ctx, executor_address, keys["rogue"], ROGUE)
            time.sleep(0.3)
            impostor.close()
        time.sleep(1.0)  # an idle scheduler looks at its executor every 0.2 s
    finally:
        ctx.destroy(linger=0)
    status = asyncio.run(_status(address, keys["gateway"], timeout=30))
    assert status.state == pb.ENGINE_STATE_SERVING
    assert status.counters.num_executor_restarts == 0
    assert proc.poll() is None
    text = log.read_text()
    assert "not authorized" in text and "connection dropped" not in text, text
