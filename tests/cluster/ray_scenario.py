"""What tests/cluster/test_ray.py runs inside a network and PID namespace of its own
(``unshare --net --pid --fork --mount-proc``: only ``lo``, and a process table holding
this run alone, so that ``ray stop`` can touch nothing else). It starts a Ray head on
127.0.0.1, ``tessera serve --cluster ray --replicas 2`` on it, streams, kills one
replica's actor with ``ray.kill`` mid-stream, stops everything, and writes what it saw
to a JSON file for the test to judge (this process is PID 1 here: when it exits, the
kernel ends whatever is left in the namespace).

    python -P tests/cluster/ray_scenario.py OUT.json WORK_DIR
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc

NUM_STREAMS = 16
PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "Once upon a time in a land far away, there lived",
    "1 2 3 4 5 6",
    "Write a list of five fruits:\n1.",
    "The quick brown fox",
    "Tessera is a serving engine that",
    "In 1969, the first humans",
]
RAY_PORT = 6379
GRPC_PORT = 50051


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))


def max_tokens(i: int) -> int:
    return 32 + i % 9


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a new network namespace starts with lo down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def main(out_path: str, work: str) -> None:
    loopback_up()
    work_dir = Path(work)
    tmp = work_dir / "tmp"  # every process's TMPDIR: what is left in it is a leak
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0",
               TESSERA_LOG_LEVEL="INFO", TESSERA_SCHEDULER_TIMEOUT="2")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent
    result: dict = {"interfaces": sorted(name for _, name in socket.if_nameindex())}
    log = open(work_dir / "serve.log", "w")  # noqa: SIM115 (closed at the end)
    launcher = None
    try:
        subprocess.run(
            [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(RAY_PORT), "--num-cpus", "4", "--temp-dir", str(work_dir / "r"),
             "--include-dashboard", "false", "--disable-usage-stats"],
            env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
        started = time.monotonic()
        launcher = subprocess.Popen(
            [sys.executable, "-P", "-m", "tessera", "serve", "--cluster", "ray",
             "--ray-address", f"127.0.0.1:{RAY_PORT}", "--replicas", "2", "--device", "cpu",
             "--generation-config", "none", "--port", str(GRPC_PORT), "--http-port", "0",
             "--num-tokenizers", "1", "--max-num-seqs", "16",
             "--kv-cache-memory", str(256 << 20), "--grace-seconds", "20"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        stub = pb_grpc.TesseraStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
        wait_for(lambda: serving(stub) == 2, 240, "two replicas serving")
        result["ready_s"] = time.monotonic() - started
        result["schedulers"] = commands("-m tessera.scheduler ")
        import ray

        ray.init(address=f"127.0.0.1:{RAY_PORT}", namespace="tessera",
                 logging_level="WARNING", log_to_driver=False)  # fmt: skip
        names = sorted(ray.util.list_named_actors())
        result["actors_before"] = names
        victim = ray.get_actor(next(n for n in names if n.endswith("-replica-1.0")))
        victim_pids = result["victim_pids"] = ray.get(victim.pids.remote())
        result.update(asyncio.run(streams(stub, victim, ray)))
        result["victim_pids_alive"] = [p for p in victim_pids if alive(p)]
        # the supervisor makes replica 1 again, and the gateway links to it
        wait_for(lambda: serving(stub) == 2 and len(listed(stub)) == 2, 120, "a new replica 1")
        result["actors_after"] = sorted(ray.util.list_named_actors())
        result["replicas_after"] = listed(stub)
        result["schedulers_after"] = commands("-m tessera.scheduler ")
        result["sockets"] = sockets_by_process()
        ray.shutdown()
        launcher.send_signal(signal.SIGTERM)
        result["serve_rc"] = launcher.wait(90)
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        stop = subprocess.Popen([str(bin_dir / "ray"), "stop"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        # Ray's daemons are orphans of this PID 1: reap them as they exit, or ray stop
        # would wait out its grace period for zombies
        deadline = time.monotonic() + 120
        while stop.poll() is None and time.monotonic() < deadline:
            reap(keep={stop.pid})
            time.sleep(0.1)
        if stop.poll() is None:
            stop.kill()
        stop.wait()
        log.close()
    result["left"] = leftovers()
    result["files_left"] = sorted(os.listdir(tmp))
    Path(out_path).write_text(json.dumps(result))


async def streams(stub_sync, victim, ray) -> dict:
    tokens: list[list[int]] = [[] for _ in range(NUM_STREAMS)]
    errors: list[str] = []
    seen: dict = {}

    async def one(stub, i: int) -> None:
        request = pb.GenerateRequest(text=prompt(i), sampling=pb.SamplingParameters(
            temperature=0.0, max_tokens=max_tokens(i), ignore_eos=True))
        try:
            async for msg in stub.Generate(request, timeout=180):
                tokens[i].extend(msg.token_ids)
        except grpc.aio.AioRpcError as e:
            errors.append(f"stream {i}: {e.code()} {e.details()}")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.TesseraStub(channel)
        tasks = [asyncio.create_task(one(stub, i)) for i in range(NUM_STREAMS)]
        deadline = time.monotonic() + 120
        while not all(len(t) >= 2 for t in tokens):
            if time.monotonic() > deadline or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.02)
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        seen["open_at_kill"] = [r.num_open for r in load.replicas]
        seen["addresses_at_kill"] = [r.address for r in load.replicas]
        ray.kill(victim, no_restart=True)
        seen["tokens_at_kill"] = [len(t) for t in tokens]
        await asyncio.gather(*tasks)
    seen["tokens"] = tokens
    seen["errors"] = errors
    load = stub_sync.GetLoad(pb.GetLoadRequest(), timeout=5)
    seen["resumed"] = {r.address: r.num_resumed for r in load.replicas}
    return seen


def serving(stub) -> int:
    try:
        return sum(r.serving for r in stub.GetLoad(pb.GetLoadRequest(), timeout=2).replicas)
    except grpc.RpcError:
        return 0


def listed(stub) -> list[str]:
    return [r.address for r in stub.GetLoad(pb.GetLoadRequest(), timeout=5).replicas]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def commands(part: str) -> list[str]:
    """The command lines of the processes here that contain ``part`` (not the guards
    that run them: tessera.ray_serve.guard)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if part in cmd and "--guard" not in cmd and alive(int(pid)):
            found.append(cmd)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def reap(keep: frozenset[int] | set[int] = frozenset()) -> None:
    """PID 1 adopts orphans (Ray's daemons): collect the ones that exited, but not
    ``keep``, children whose exit code a Popen still waits for."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in keep:
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            try:
                os.waitpid(int(name), os.WNOHANG)
            except ChildProcessError:
                pass


def leftovers() -> list[str]:
    """Every process of this namespace but this one, after everything was stopped."""
    deadline = time.monotonic() + 15
    while True:
        reap()
        left = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
                and alive(int(p))]  # fmt: skip
        if not left or time.monotonic() > deadline:
            return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                    for p in left if alive(p)]  # fmt: skip
        time.sleep(0.5)


def _addr(hex_addr: str) -> str:
    """A /proc/net/tcp{,6} address as text, without the port."""
    host = hex_addr.split(":")[0]
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def sockets_by_process() -> dict[str, list[list[str]]]:
    """For every process here whose command names ray or tessera: its TCP sockets as
    [local address, remote address] (remote 0.0.0.0 / :: for a listener)."""
    table: dict[str, tuple[str, str]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(path).read_text().splitlines()[1:]:
            f = line.split()
            table[f[9]] = (_addr(f[1]), _addr(f[2]))
    out: dict[str, list[list[str]]] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if "ray" not in cmd and "tessera" not in cmd:
            continue
        inodes = [link[8:-1] for link in links if link.startswith("socket:[")]
        found = [list(table[i]) for i in inodes if i in table]
        if found:
            out[f"{pid} {cmd[:120]}"] = found
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
