"""``tessera serve --cluster ray``: the engine replicas as actors on a running Ray cluster.

    launcher (here) ─┬─ tokenizer_svc x num_tokenizers      (unix sockets, as with local)
                     ├─ gateway --scheduler-address file:RUN_DIR/replicas
                     └─ Ray driver ── replica r: placement group, one bundle per device,
                                      STRICT_PACK (a replica's ranks share one node)
                                        └─ EngineReplica actor (bundle 0)
                                             └─ python -m tessera.scheduler ── executor ranks

Ray places the replicas; Tessera does the rest as it always does. Each actor starts the
scheduler process (which starts its executor ranks) with its gateway socket on
``tcp://NODE_IP:PORT``, secured with CURVE (common.curve: a socket other machines can
reach is never plain), and answers with that address once the scheduler listens. The
supervisor (``RayReplicas.check``, once per launcher tick) writes the addresses of the
serving replicas to a file, which the gateway reads every second
(services.engine_pool); a replica whose actor dies (``ray.kill``, its node lost, its
scheduler gone) is dropped from the file and made again, with a new placement group,
and the gateway resumes its streams on the others (recompute from the tokens streamed).

Keys: one scheduler key pair for every replica and one for the gateway, made here for
this run and never written to disk. Each process that needs a key file reads it from
an in-memory file (memfd) that its parent holds, as ``/proc/PID/fd/N``: the actor for
its scheduler (and the executors it restarts), the launcher for the gateway. So a
replica killed any way leaves no key behind: its keys go with its process.

Only plain strings, numbers and lists cross into the actors. ``ray`` is an optional
extra (``pip install 'tessera[ray]'``), imported only in the functions of this path.
GPU replicas (one ``{"GPU": 1}`` bundle per tensor-parallel rank) are written for but
were not run here; the tests run CPU replicas on one node.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from tessera.common.curve import certificate_text
from tessera.common.preflight import EXIT_CONFIG, ConfigError
from tessera.common.process import exit_with_parent

if TYPE_CHECKING:  # tessera.serve imports this module, on this path only
    from tessera.serve import ServeConfig

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # a replica's scheduler may take this long to listen (model load)
STOP_GRACE_S = 15.0  # a replica's scheduler gets this long to stop on SIGTERM
PLACING_LOG_S = 30.0  # a replica Ray cannot place yet is reported this often
MAX_REMAKES = 5  # a replica lost more often than this stops the launcher (exit 1)


def uses_gpus(config: ServeConfig, cluster_resources: dict[str, float]) -> bool:
    """Whether the replicas hold GPUs: cuda asked for, or auto on a cluster that has any."""
    if config.device.startswith("cuda"):
        return True
    return config.device == "auto" and cluster_resources.get("GPU", 0) > 0


def replica_bundles(config: ServeConfig, gpus: bool) -> list[dict[str, float]]:
    """One placement-group bundle per device of a replica (a tensor-parallel rank each),
    the replica's CPUs spread over them; on the CPU one bundle per rank too."""
    n = config.tensor_parallel_size
    cpus = config.ray_num_cpus / n
    return [{"CPU": cpus, "GPU": 1.0} if gpus else {"CPU": cpus} for _ in range(n)]


def check_room(config: ServeConfig, resources: dict[str, float], gpus: bool) -> None:
    """ConfigError if the cluster, all of it, is too small for the replicas."""
    need = {"CPU": config.replicas * config.ray_num_cpus}
    if gpus:
        need["GPU"] = float(config.replicas * config.tensor_parallel_size)
    for name, amount in need.items():
        if resources.get(name, 0.0) < amount:
            raise ConfigError(
                f"the Ray cluster has {resources.get(name, 0.0):g} {name}; {config.replicas} "
                f"replicas need {amount:g} (--replicas, --ray-num-cpus, "
                "--tensor-parallel-size); add nodes or ask for less"
            )


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConfigError unless the cluster's HOST:PORT (GCS) takes a TCP connection; "auto"
    and ray:// addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot join the Ray cluster at {address} (--ray-address, "
                          f"RAY_ADDRESS): {e}; is `ray start --head` running there?") from None


def write_listing(path: str, addresses: list[str]) -> None:
    """The gateway's replica list, replaced whole (it never reads half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(f"{a}\n" for a in addresses))
    os.replace(tmp, path)


def hold_in_memory(name: str, text: str) -> tuple[int, str]:
    """An in-memory file holding ``text`` and the path by which children read it; it
    lives as long as this process (or until the fd is closed)."""
    fd = os.memfd_create(name)  # not inherited: children open it by path
    os.write(fd, text.encode())
    return fd, f"/proc/{os.getpid()}/fd/{fd}"


# -- inside Ray: the actors ----------------------------------------------------------------


class EngineReplica:
    """A Ray actor: one engine replica, its scheduler a child process that exits with
    the actor (PDEATHSIG). Only plain values in and out."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._fds: list[int] = []

    def start(self, flags: list[str], secret_key: str, authorized_key: str,
              env: dict[str, str], timeout: float) -> dict[str, Any]:
        """Start the scheduler; {"address": ...} once it listens, or {"exit_code": ...}
        if it exited first (a timeout kills it and says so)."""
        import ray

        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        secret_fd, secret_path = hold_in_memory("scheduler.key_secret", secret_key)
        authorized_fd, authorized_path = hold_in_memory("gateway.key", authorized_key)
        self._fds += [secret_fd, authorized_fd]
        cmd = [sys.executable, "-P", "-m", "tessera.scheduler", *flags,
               "--gateway-address", address, "--curve-secret-key-file", secret_path,
               "--curve-authorized-keys", authorized_path]  # fmt: skip
        # Through a guard: a killed actor's worker SIGKILLs its children and its process
        # group on the way out (Ray's kill_child_processes_on_worker_exit and process
        # group cleanup), which would leave the scheduler no time to end its streams (as
        # unavailable, so that the gateway resumes them at once) or to remove its private
        # socket directory. The guard takes that SIGKILL; the scheduler, its child in a
        # session of its own, gets SIGTERM (PDEATHSIG) and stops cleanly.
        guard = [sys.executable, "-P", "-m", "tessera.ray_serve", "--guard", "--"]
        self._proc = subprocess.Popen(guard + cmd, env={**os.environ, **env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                return {"exit_code": code}
            if _listens(host, port):
                return {"address": address}
            time.sleep(0.2)
        return {"exit_code": self.stop(), "timed_out": True}

    def wait(self) -> int:
        """Blocks until the scheduler exits; its exit code (128 + N: signal N)."""
        assert self._proc is not None, "start() first"
        return self._proc.wait()

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        code = 0
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                code = self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        return code

    def pids(self) -> list[int]:
        """This actor's process, its guard's and its scheduler's (for tests and logs)."""
        if self._proc is None:
            return [os.getpid()]
        guard = self._proc.pid
        try:
            with open(f"/proc/{guard}/task/{guard}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            children = []
        return [os.getpid(), guard, *children]


class DeviceLease:
    """A Ray actor that holds one GPU bundle of a replica's placement group and says
    which device Ray gave it, so that the replica's ranks get exactly those."""

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]


def guard(argv: list[str]) -> int:
    """Run ``argv`` as a child in a session (and process group) of its own and wait for
    it; SIGTERM and SIGINT are passed on, and the guard follows its parent (the actor):
    SIGTERM when it dies. Returns the child's exit code, 128 + N if signal N ended it."""
    exit_with_parent()
    child = subprocess.Popen(argv, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- the launcher's side: the supervisor ------------------------------------------------------


@dataclass(slots=True)
class _Replica:
    index: int
    restarts: int = 0
    state: str = "placing"  # placing -> starting -> serving; again after a loss
    group: Any = None  # its placement group
    leases: tuple[Any, ...] = ()  # DeviceLease actors (GPU replicas)
    actor: Any = None
    ref: Any = None  # what is awaited: the group ready, start(), or wait()
    since: float = 0.0
    address: str | None = None


class RayReplicas:
    """The engine replicas on Ray: made, watched, made again; ``check`` is called once
    per launcher tick and returns an exit code when the launcher must stop."""

    def __init__(self, config: ServeConfig, gpus: bool) -> None:
        self.config = config
        self.gpus = gpus
        self.replicas = [_Replica(r) for r in range(config.replicas)]
        self.listing = ""
        self._fds: list[int] = []
        self._scheduler_pair = zmq.curve_keypair()
        self._gateway_pair = zmq.curve_keypair()
        self._listed: list[str] = []
        self._last_placing_log = time.monotonic()
        self.scheduler_flags: list[str] = []
        # Actors are named RUN-replica-R.N (the N-th making of replica R), so that
        # `ray list actors` and ray.util.list_named_actors tell runs and makings apart.
        self.run_name = f"tessera-{os.getpid()}-{int(time.time())}"

    @classmethod
    def connect(cls, config: ServeConfig) -> RayReplicas:
        """Join the cluster; ConfigError (one line) without Ray, without a cluster, or
        with a cluster too small for the replicas."""
        try:
            import ray
        except ImportError:
            raise ConfigError("--cluster ray needs Ray: pip install 'tessera[ray]'") from None
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        # Ray waits minutes for a cluster that is not there: ask its port first.
        check_reachable(address)
        try:
            ray.init(address=address, namespace=config.ray_namespace,
                     logging_level=logging.WARNING, log_to_driver=True)  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot join the Ray cluster at {address} (--ray-address; "
                              f"start one with `ray start --head`): {first}") from None
        resources = ray.cluster_resources()
        gpus = uses_gpus(config, resources)
        try:
            check_room(config, resources, gpus)
        except ConfigError:
            ray.shutdown()
            raise
        return cls(config, gpus)

    def start(
        self, run_dir: str, commands: list[tuple[str, list[str]]], scheduler_flags: list[str]
    ) -> list[tuple[str, list[str]]]:
        """Ask Ray for every replica (they start meanwhile), each a scheduler with
        ``scheduler_flags``, and return the commands of the processes that run here: the
        tokenizers and the gateway of ``commands`` (those of one local replica), the
        gateway pointed at the replica list."""
        self.scheduler_flags = list(scheduler_flags)
        self.listing = os.path.join(run_dir, "replicas")
        write_listing(self.listing, [])
        gateway_secret = self._hold("gateway.key_secret", certificate_text(*self._gateway_pair))
        scheduler_public = self._hold("scheduler.key", certificate_text(self._scheduler_pair[0]))
        for replica in self.replicas:
            self._place(replica)
        local = []
        for name, cmd in commands:
            if name.startswith("scheduler"):
                continue
            if cmd[cmd.index("-m") + 1] == "tessera.services":  # a gateway (of one or several)
                cmd = list(cmd)
                cmd[cmd.index("--scheduler-address") + 1] = f"file:{self.listing}"
                cmd += ["--curve-secret-key-file", gateway_secret,
                        "--curve-server-key-file", scheduler_public]  # fmt: skip
            local.append((name, cmd))
        logger.info("asked Ray for %d engine replicas (%s each); the gateway reads %s",
                    len(self.replicas), replica_bundles(self.config, self.gpus), self.listing)
        return local

    def check(self) -> int | None:
        """Advance every replica whose awaited step is done; None, or the exit code to
        stop with (a replica that cannot start, or was lost too often)."""
        import ray

        pending = {id(r.ref): r for r in self.replicas if r.ref is not None}
        if not pending:
            return None
        done, _ = ray.wait([r.ref for r in pending.values()], num_returns=len(pending),
                           timeout=0)  # fmt: skip
        for ref in done:
            code = self._advance(pending[id(ref)])
            if code is not None:
                return code
        placing = [r.index for r in self.replicas if r.state == "placing"]
        if placing and time.monotonic() - self._last_placing_log > PLACING_LOG_S:
            logger.warning("Ray has not placed replicas %s yet (each needs %s)", placing,
                           replica_bundles(self.config, self.gpus))
            self._last_placing_log = time.monotonic()
        return None

    def close(self) -> None:
        """Stop every replica's scheduler, then kill the actors and free their groups."""
        import ray

        stops = [r.actor.stop.remote() for r in self.replicas if r.actor is not None]
        try:
            ray.get(stops, timeout=STOP_GRACE_S + 5)
        except ray.exceptions.GetTimeoutError:
            logger.warning("replicas did not stop in %.0fs; killing them", STOP_GRACE_S + 5)
        except ray.exceptions.RayError as e:  # one died meanwhile: killed below
            logger.info("a replica stopped with: %s", str(e).splitlines()[0])
        for replica in self.replicas:
            self._release(replica)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        ray.shutdown()

    # -- inside --------------------------------------------------------------------------------

    def _hold(self, name: str, text: str) -> str:
        fd, path = hold_in_memory(name, text)
        self._fds.append(fd)
        return path

    def _place(self, replica: _Replica) -> None:
        from ray.util.placement_group import placement_group

        replica.group = placement_group(replica_bundles(self.config, self.gpus),
                                        strategy="STRICT_PACK")  # fmt: skip
        replica.state, replica.ref = "placing", replica.group.ready()
        replica.since = time.monotonic()

    def _advance(self, replica: _Replica) -> int | None:
        import ray

        try:
            result = ray.get(replica.ref)
        except ray.exceptions.RayError as e:  # the actor died (killed, its node lost)
            return self._lost(replica, f"its actor died ({type(e).__name__})")
        if replica.state == "placing":
            self._start(replica)
        elif replica.state == "starting":
            if "address" in result:
                replica.state, replica.address = "serving", result["address"]
                replica.ref = replica.actor.wait.remote()
                logger.info("engine replica %d serves on %s (%.1fs after it was asked for)",
                            replica.index, replica.address, time.monotonic() - replica.since)
                self._write_listing()
                return None
            code = result["exit_code"]
            if code == EXIT_CONFIG:
                logger.error("engine replica %d: its scheduler refused the configuration "
                             "(exit code %d; its log says why)", replica.index, code)
                return EXIT_CONFIG
            why = "did not listen in time" if result.get("timed_out") else f"exited ({code})"
            return self._lost(replica, f"its scheduler {why} before serving")
        else:  # serving, and wait() returned: the scheduler exited
            return self._lost(replica, f"its scheduler exited with code {result}")
        return None

    def _start(self, replica: _Replica) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(replica.group, placement_group_bundle_index=i)

        env = {"TESSERA_LOG_LEVEL": os.environ.get("TESSERA_LOG_LEVEL", "INFO")}
        bundles = replica_bundles(self.config, self.gpus)
        if self.gpus:  # one lease per device: the ranks get exactly the GPUs Ray gave
            replica.leases = tuple(
                ray.remote(DeviceLease).options(num_cpus=0, num_gpus=1,
                                                scheduling_strategy=in_bundle(i)).remote()
                for i in range(len(bundles))
            )  # fmt: skip
            ids = ray.get([lease.gpu_ids.remote() for lease in replica.leases], timeout=60)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(i for group in ids for i in group)
        replica.actor = ray.remote(EngineReplica).options(
            num_cpus=bundles[0]["CPU"], num_gpus=0, max_concurrency=2,  # wait() with stop()
            scheduling_strategy=in_bundle(0),
            name=f"{self.run_name}-replica-{replica.index}.{replica.restarts}",
        ).remote()  # fmt: skip
        flags = self.scheduler_flags
        scheduler_secret = certificate_text(*self._scheduler_pair)
        gateway_public = certificate_text(self._gateway_pair[0])
        replica.ref = replica.actor.start.remote(flags, scheduler_secret, gateway_public, env,
                                                 START_TIMEOUT_S)  # fmt: skip
        replica.state = "starting"

    def _lost(self, replica: _Replica, why: str) -> int | None:
        """Drop the replica from the gateway's list and make it again (a new group, a
        new actor), unless it was lost too often."""
        self._release(replica)
        self._write_listing()
        replica.restarts += 1
        if replica.restarts > MAX_REMAKES:
            logger.error("engine replica %d lost: %s; made %d times, giving up",
                         replica.index, why, MAX_REMAKES + 1)
            return 1
        logger.warning("engine replica %d lost: %s; making it again", replica.index, why)
        self._place(replica)
        return None

    def _release(self, replica: _Replica) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in (replica.actor, *replica.leases):
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except ValueError:  # not an actor handle Ray still knows
                    pass
        if replica.group is not None:
            remove_placement_group(replica.group)
        replica.actor, replica.leases, replica.group, replica.ref = None, (), None, None
        replica.address = None

    def _write_listing(self) -> None:
        addresses = [r.address for r in self.replicas if r.address is not None]
        if addresses != self._listed:
            write_listing(self.listing, addresses)
            self._listed = addresses


if __name__ == "__main__":  # python -m tessera.ray_serve --guard -- COMMAND...
    if sys.argv[1:3] != ["--guard", "--"] or len(sys.argv) < 4:
        sys.exit("usage: python -m tessera.ray_serve --guard -- COMMAND...")
    sys.exit(guard(sys.argv[3:]))
