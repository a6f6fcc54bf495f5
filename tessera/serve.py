"""``tessera serve``: start the whole set of processes on one machine and supervise them.

    launcher ─┬─ tokenizer_svc  x num_tokenizers   (gRPC on unix sockets)
              ├─ scheduler ── executor  x replicas (ZeroMQ on ipc://)
              └─ gateway                           (public gRPC on host:port,
                                                    OpenAI HTTP on host:http_port)

With ``--replicas N`` the engine (a scheduler with its executor ranks) runs N times,
each with its own KV cache, and the gateway routes every request to one of them
(``--routing-policy``; services.routing) and resumes the streams of a replica that dies
on another (services.engine_pool) while the launcher restarts it.

The internal links stay on unix sockets in ``run_dir``; the public ports get the API
key (passed in the gateway's environment) and, with ``--tls-cert-file`` and
``--tls-key-file``, TLS, or mutual TLS with ``--tls-client-ca-file``.

Every child exits with its parent. On SIGTERM or Ctrl-C the gateway stops taking new
calls and lets in-flight streams finish within ``grace_seconds``; then the scheduler
(with its executor) and the tokenizers stop. The launcher exits 0 when every child did.
A tokenizer replica that dies is restarted (the gateway skips it meanwhile). So is a
scheduler or a gateway killed by a signal (the OOM killer, SIGKILL, a crash): a dead
scheduler takes its executor with it and the gateway fails its streams as UNAVAILABLE
until the new one serves; a dead gateway's requests are aborted by the scheduler
(heartbeats), which frees their blocks. Each child is restarted at most MAX_RESTARTS
times. A scheduler or gateway that exits with an error code (it logged why: bad flags,
a model that does not load) stops the rest, and the launcher exits 1. Every child dies
with the launcher, however it dies (PDEATHSIG), so none is ever orphaned.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tessera.common.cli_args import env_name
from tessera.common.process import setup_logging

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ServeConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = field(
        default=8000, metadata={"help": "OpenAI-compatible HTTP API port; 0 turns it off"}
    )
    # Handed to the gateway in its environment, not its command line (which ps shows).
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "require Authorization: Bearer <key> on every route but health"},
    )
    tls_cert_file: str | None = field(
        default=None,
        metadata={"help": "PEM certificate chain: TLS on the gRPC and HTTP ports (with "
                  "tls_key_file)"},
    )
    tls_key_file: str | None = field(
        default=None, metadata={"help": "PEM private key of tls_cert_file"}
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle: mutual TLS, clients need a certificate it signed"},
    )
    max_open_requests: int = 4096  # per gateway; past it clients get 429 / RESOURCE_EXHAUSTED
    num_tokenizers: int = 2
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # auto | fp8 (executor/config.py)
    quantization: str = field(
        default="auto", metadata={"help": "4-bit weights: auto | none | gptq | awq"}
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "executor ranks, one process per device, that run each step "
                  "together (gloo on the CPU, NCCL on CUDA)"},
    )
    policy: str = "fcfs"
    replicas: int = field(
        default=1,
        metadata={"help": "engine replicas (a scheduler with its executor ranks each) behind "
                  "the gateway, each with its own KV cache"},
    )
    routing_policy: str = field(
        default="auto",
        metadata={"help": "the gateway's choice of replica: cache_aware, least_loaded, "
                  "round_robin, or auto (cache_aware with prefix caching, else least_loaded)"},
    )
    # Plan step N+1 while step N runs (scheduler/server.py); off: one step at a time.
    async_scheduling: bool = True
    # Share the KV of common prompt prefixes (scheduler/kv_cache_manager.py).
    enable_prefix_caching: bool = True
    max_waiting: int = 4096
    max_waiting_tokens: int = 1 << 20  # prompt tokens waiting in the scheduler, at most
    # Generate streams at once on one gRPC client connection; past it RESOURCE_EXHAUSTED.
    max_streams_per_connection: int = 256
    grace_seconds: float = 30.0
    run_dir: str | None = None  # where the unix sockets live; a fresh temp dir by default,
    # removed when the launcher exits

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.routing_policy != "auto":
            from tessera.services.routing import RoutingPolicy

            RoutingPolicy.parse(self.routing_policy)
        if self.num_tokenizers < 0:
            raise ValueError(f"num_tokenizers must be >= 0, got {self.num_tokenizers}")
        if self.tensor_parallel_size != 1:  # a split the model refuses, before any process
            from tessera.common.registry import resolve_model
            from tessera.executor.parallel import check_splittable, read_model_config

            shape = read_model_config(resolve_model(self.model))
            check_splittable(shape, self.tensor_parallel_size)
        # 0 only for a model without a tokenizer (random weights): token ids in and out.


@dataclass(slots=True)
class _Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    env: dict[str, str] | None = None
    restarts: int = 0

    @property
    def restartable(self) -> bool:
        """Tokenizers are stateless: a new replica is as good as the old one, and the
        gateway's client skips a dead replica until it answers again. A scheduler or
        gateway is restarted when a signal killed it; an exit code is an error it logged,
        which a restart would only repeat."""
        if self.restarts >= MAX_RESTARTS:
            return False
        return self.name.startswith("tokenizer-") or self.proc.returncode < 0


MAX_RESTARTS = 5


def child_commands(config: ServeConfig, run_dir: str) -> list[tuple[str, list[str]]]:
    py = [sys.executable, "-P", "-m"]
    tok_addrs = [f"unix:{run_dir}/tokenizer-{i}.sock" for i in range(config.num_tokenizers)]
    # One replica keeps the names it always had; replica r of several gets "-r".
    names = ["scheduler"] if config.replicas == 1 else [
        f"scheduler-{r}" for r in range(config.replicas)]
    sched_addrs = [f"ipc://{run_dir}/{name}.sock" for name in names]
    exec_addrs = [f"ipc://{run_dir}/{name.replace('scheduler', 'executor')}.sock"
                  for name in names]
    policy = config.routing_policy
    if policy == "auto":
        policy = "cache_aware" if config.enable_prefix_caching else "least_loaded"
    engine_flags = [
        "--model",
        config.model,
        "--device",
        config.device,
        "--dtype",
        config.dtype,
        "--block-size",
        str(config.block_size),
        "--max-num-seqs",
        str(config.max_num_seqs),
        "--max-num-batched-tokens",
        str(config.max_num_batched_tokens),
        "--gpu-memory-utilization",
        str(config.gpu_memory_utilization),
        "--kv-cache-dtype",
        config.kv_cache_dtype,
        "--quantization",
        config.quantization,
        "--policy",
        config.policy,
        "--max-waiting",
        str(config.max_waiting),
        "--max-waiting-tokens",
        str(config.max_waiting_tokens),
    ]
    if not config.async_scheduling:
        engine_flags.append("--no-async-scheduling")
    if not config.enable_prefix_caching:
        engine_flags.append("--no-enable-prefix-caching")
    if config.max_model_len is not None:
        engine_flags += ["--max-model-len", str(config.max_model_len)]
    if config.kv_cache_memory is not None:
        engine_flags += ["--kv-cache-memory", str(config.kv_cache_memory)]
    if config.tensor_parallel_size != 1:
        engine_flags += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    commands = [
        (f"tokenizer-{i}",
         py + ["tessera.tokenizer_svc", "--model", config.model, "--address", addr])
        for i, addr in enumerate(tok_addrs)
    ]
    for name, sched_addr, exec_addr in zip(names, sched_addrs, exec_addrs, strict=True):
        commands.append((name, py + ["tessera.scheduler"] + engine_flags + [
            "--gateway-address", sched_addr, "--executor-address", exec_addr]))
    commands.append(
        (
            "gateway",
            py
            + [
                "tessera.services",
                "--model",
                config.model,
                "--host",
                config.host,
                "--port",
                str(config.port),
                "--http-port",
                str(config.http_port),
                "--max-open-requests",
                str(config.max_open_requests),
                "--max-streams-per-connection",
                str(config.max_streams_per_connection),
                "--scheduler-address",
                ",".join(sched_addrs),
                "--routing-policy",
                policy,
                "--tokenizer-addresses",
                ",".join(tok_addrs),
                "--grace-seconds",
                str(config.grace_seconds),
                *_tls_flags(config),
            ],
        )
    )
    return commands


def _tls_flags(config: ServeConfig) -> list[str]:
    flags = []
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        value = getattr(config, name)
        if value is not None:
            flags.append(f"--{name.replace('_', '-')}={os.path.abspath(value)}")
    return flags


def child_env(
    name: str, config: ServeConfig, environ: dict[str, str] | None = None
) -> dict[str, str] | None:
    """The gateway gets the API key in its environment; engine replica r of several gets
    its own devices (CUDA_VISIBLE_DEVICES); the others inherit ours."""
    environ = dict(os.environ if environ is None else environ)
    if name == "gateway" and config.api_key is not None:
        return {**environ, env_name("api_key"): config.api_key}
    devices = replica_devices(name, config, environ.get("CUDA_VISIBLE_DEVICES"))
    if devices is not None:
        return {**environ, "CUDA_VISIBLE_DEVICES": devices}
    return None


def replica_devices(name: str, config: ServeConfig, visible: str | None) -> str | None:
    """The GPUs of engine replica ``scheduler-r``: the r-th run of tensor_parallel_size
    devices among those visible (all of them when CUDA_VISIBLE_DEVICES is unset), so that
    replicas never share a device. None on the CPU, and for one replica."""
    if config.replicas == 1 or config.device == "cpu" or not name.startswith("scheduler-"):
        return None
    if visible is not None and not visible.strip():  # no GPU at all: nothing to split
        return None
    r, n = int(name.rpartition("-")[2]), config.tensor_parallel_size
    if visible is None:
        ids = [str(i) for i in range(config.replicas * n)]
    else:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    if len(ids) < config.replicas * n:
        raise ValueError(
            f"{config.replicas} replicas of {n} devices each need {config.replicas * n} "
            f"devices; CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}"
        )
    return ",".join(ids[r * n : (r + 1) * n])


def run_serve(config: ServeConfig) -> int:
    setup_logging("launcher")
    if config.run_dir is not None:
        os.makedirs(config.run_dir, exist_ok=True)
        return _run(config, config.run_dir)
    # A run directory of our own goes with us: once every child has stopped, its sockets
    # are dead files that nobody else may use.
    run_dir = tempfile.mkdtemp(prefix="tessera-")
    try:
        return _run(config, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(config: ServeConfig, run_dir: str) -> int:
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: list[_Child] = []
    # Every environment first: a setting at fault stops us before any child starts.
    commands = [(name, cmd, child_env(name, config)) for name, cmd in
                child_commands(config, run_dir)]  # fmt: skip
    for name, cmd, env in commands:
        logger.info("starting %s", name)
        children.append(_Child(name, cmd, subprocess.Popen(cmd, env=env), env))
    logger.info(
        "serving %s on %s: gRPC port %d, HTTP port %s (sockets in %s)",
        config.model,
        config.host,
        config.port,
        config.http_port or "off",
        run_dir,
    )
    failed = None
    while not stopping:
        for child in children:
            if child.proc.poll() is None:
                continue
            if child.restartable:
                logger.warning(
                    "%s exited with code %s; restarting it", child.name, child.proc.returncode
                )
                child.restarts += 1
                child.proc = subprocess.Popen(child.cmd, env=child.env)
                continue
            failed = child
            break
        if failed is not None:
            logger.error("%s exited with code %s; stopping", failed.name, failed.proc.returncode)
            break
        time.sleep(0.2)
    codes = _shutdown(children, config.grace_seconds)
    if failed is not None:
        return 1
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        logger.error("children exited with errors: %s", bad)
        return 1
    logger.info("all processes stopped cleanly")
    return 0


def _shutdown(children: list[_Child], grace: float) -> dict[str, int]:
    """Gateway first (it drains the streams), then the engine and the tokenizers."""
    gateway = [c for c in children if c.name == "gateway"]
    rest = [c for c in children if c.name != "gateway"]
    codes: dict[str, int] = {}
    for group, timeout in ((gateway, grace + 10.0), (rest, 15.0)):
        for child in group:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in group:
            try:
                codes[child.name] = child.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.error("%s did not stop in %.0fs; killing it", child.name, timeout)
                child.proc.kill()
                codes[child.name] = child.proc.wait()
    return codes
