"""Several gateway processes on the same public ports: `tessera serve --num-gateways 2`.

Both gateways listen on the gRPC and the HTTP port (SO_REUSEPORT); the kernel hands
each new connection to one of them. Sixteen connections of their own (a client's
subchannel each) land on both, each gateway streams what the engine makes, and every
stream gets the same greedy tokens as the offline engine. The API key guards both.
Without --num-gateways a taken port stays an error (tests/test_cli.py).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import httpx
import pytest

from tessera import LLM, SamplingParams
from tessera.common.preflight import ConfigError
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tessera.serve import ServeConfig, child_commands, child_env
from tessera.services.gateway import GatewayConfig, preflight
from tests.proctable import cmdline, descendants
from tests.services.launch import PROMPTS, Server

NUM_CONNECTIONS = 16  # all on one of two gateways by chance: 2 in 65,536
MAX_TOKENS = 12
LISTEN, ESTABLISHED = "0A", "01"  # /proc/net/tcp states


def test_each_gateway_gets_the_shared_ports_and_the_api_key():
    config = ServeConfig(num_gateways=3, api_key="secret-key")
    commands = dict(child_commands(config, "/run"))
    gateways = [name for name in commands if name.startswith("gateway")]
    assert gateways == ["gateway-0", "gateway-1", "gateway-2"]
    for name in gateways:
        assert "--reuse-port" in commands[name]
        assert child_env(name, config, {})["TESSERA_API_KEY"] == "secret-key"
    # One gateway keeps its name, and a taken port stays an error for it.
    single = dict(child_commands(ServeConfig(), "/run"))
    assert "gateway" in single and "--reuse-port" not in single["gateway"]
    with pytest.raises(ValueError, match="num_gateways must be >= 1"):
        ServeConfig(num_gateways=0)


def test_a_gateway_sharing_the_port_starts_while_another_listens_on_it():
    # The gateways of one launcher start in any order: the second must not take the
    # first's listening socket for a stranger's (the launcher checked the port before).
    with socket.socket() as sibling:
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sibling.bind(("127.0.0.1", 0))
        sibling.listen()
        port = sibling.getsockname()[1]
        preflight(GatewayConfig(port=port, http_port=0, reuse_port=True))
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            preflight(GatewayConfig(port=port, http_port=0))


def _sockets(pid: int, port: int) -> dict[str, int]:
    """How many of the process's TCP sockets on local ``port`` are in each state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and int(local.rsplit(":", 1)[1], 16) == port:
                states[state] = states.get(state, 0) + 1
    return states


def _gateways(server: Server) -> list[int]:
    return [pid for pid in descendants(server.proc.pid) if "tessera.services" in cmdline(pid)]


@pytest.mark.slow
def test_two_gateways_share_both_ports_and_each_streams_tokens(tmp_path):
    prompt = PROMPTS[0]
    llm = LLM("smollm2-135m-instruct", device="cpu", show_progress=False)
    [offline] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                      ignore_eos=True), use_tqdm=False)  # fmt: skip
    expected = offline.outputs[0].token_ids
    del llm
    server = Server(tmp_path, num_gateways="2", api_key="secret-key")
    channels: list[grpc.Channel] = []
    try:
        gateways = _gateways(server)
        assert len(gateways) == 2
        deadline = time.monotonic() + 120
        while not all(_sockets(pid, server.port).get(LISTEN) and
                      _sockets(pid, server.http_port).get(LISTEN) for pid in gateways):  # fmt: skip
            assert time.monotonic() < deadline, "both gateways should listen on both ports"
            time.sleep(0.2)

        auth = (("authorization", "Bearer secret-key"),)
        request = pb.GenerateRequest(
            text=prompt,
            sampling=pb.SamplingParameters(temperature=0.0, max_tokens=MAX_TOKENS,
                                           ignore_eos=True),
        )  # fmt: skip
        channels = [
            grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(NUM_CONNECTIONS)
        ]
        for channel in channels:
            stub = pb_grpc.TesseraStub(channel)
            tokens = [t for r in stub.Generate(request, metadata=auth) for t in r.token_ids]
            assert tokens == expected
            with pytest.raises(grpc.RpcError) as denied:  # no key: refused, on any gateway
                list(stub.Generate(request))
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The connections (still open) are spread over both gateways.
        held = [_sockets(pid, server.port).get(ESTABLISHED, 0) for pid in gateways]
        assert sum(held) == NUM_CONNECTIONS and min(held) > 0, held
        # HTTP on the shared port, several connections: every one answered.
        for _ in range(8):
            with httpx.Client(base_url=server.http_url, timeout=60) as http:
                r = http.post("/v1/completions", headers={"Authorization": "Bearer secret-key"},
                              json={"model": "smollm2-135m-instruct", "prompt": prompt,
                                    "max_tokens": MAX_TOKENS, "temperature": 0.0,
                                    "ignore_eos": True})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    finally:
        for channel in channels:
            channel.close()
        server.stop()
    assert server.proc.returncode == 0
