"""``tessera serve``: start the whole set of processes on one machine and supervise them.

    launcher ─┬─ tokenizer_svc  x num_tokenizers   (gRPC on unix sockets)
              ├─ scheduler ── executor  x replicas (ZeroMQ on ipc://)
              └─ gateway  x num_gateways          (public gRPC on host:port,
                                                    OpenAI HTTP on host:http_port)

With ``--replicas N`` the engine (a scheduler with its executor ranks) runs N times,
each with its own KV cache, and the gateway routes every request to one of them
(``--routing-policy``; services.routing) and resumes the streams of a replica that dies
on another (services.engine_pool) while the launcher restarts it. With ``--cluster ray``
the replicas are Ray actors on a running cluster instead (tessera.ray_serve, an
``EngineCluster``): the tokenizers and the gateway still run here, and this loop calls
the cluster's ``check`` every tick.

With ``--num-gateways N`` that many gateway processes share both public ports
(SO_REUSEPORT: the kernel hands each new connection to one of them), each with its own
link to every scheduler: one gateway process streams a few tens of thousands of tokens a
second (gRPC's per-message cost and its event loop), which a small model on a fast GPU
outruns (benchmarks/served_overhead.py). Metrics and ``max_open_requests`` are per
gateway process.

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

Fail fast: before any child starts, ``preflight`` checks what would otherwise fail
after a minute of loading (the model names something, the TLS files exist, both public
ports are free), and a configuration error ends the launcher with one line and
``EXIT_CONFIG`` (2). A child that exits with ``EXIT_CONFIG`` (a bad flag, a model it
cannot load, a port it cannot bind) is never restarted: everything stops, exit code 2.
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
from dataclasses import dataclass, field, replace
from typing import Protocol

from tessera.common.cli_args import env_name, flag_name
from tessera.common.generation_config import GENERATION_CONFIG_CHOICES
from tessera.common.preflight import (
    EXIT_CONFIG,
    check_port_free,
    check_ports_differ,
    check_readable_file,
)
from tessera.common.process import setup_logging
from tessera.common.registry import DEFAULT_MODEL, resolve_model
from tessera.scheduler.config import SchedulerServerConfig

logger = logging.getLogger(__name__)

CLUSTERS = ("local", "ray")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _same_as(config_cls: type, name: str):
    """The field of that name of a stage's config, with its default and help: declared
    once, where the stage reads it."""
    f = config_cls.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass(slots=True, frozen=True)
class ServeConfig:
    """Every setting of ``tessera serve``; each reaches the stage that reads it
    (``child_commands``), and ``--help`` lists each with its help and variable."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_help("model name, GGUF file, Hugging Face directory or model id in the "
                       "local Hugging Face cache (HF_HOME; never downloaded), or "
                       "random:<shape>; also the first positional argument"),
    )
    served_model_name: tuple[str, ...] = field(
        default=(),
        metadata=_help("names clients may give as `model` (several allowed; the first is "
                       "the one /v1/models lists first and responses carry); default: "
                       "the model argument"),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_help("interface of the public gRPC and HTTP ports; 0.0.0.0 for every one"),
    )
    port: int = field(default=50051, metadata=_help("public gRPC port (tessera.v1.Tessera)"))
    http_port: int = field(
        default=8000, metadata=_help("OpenAI-compatible HTTP API port; 0 turns it off")
    )
    # Handed to the gateway in its environment, not its command line (which ps shows).
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata=_help("require Authorization: Bearer <key> on every route but health; "
                       "prefer the variable (a command line shows in ps)"),
    )
    tls_cert_file: str | None = field(
        default=None,
        metadata=_help("PEM certificate chain: TLS on the gRPC and HTTP ports (with "
                       "tls_key_file)"),
    )
    tls_key_file: str | None = field(
        default=None, metadata=_help("PEM private key of tls_cert_file")
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata=_help("PEM CA bundle: mutual TLS, clients need a certificate it signed"),
    )
    chat_template: str | None = field(
        default=None,
        metadata=_help("a Jinja chat template, or a file holding one, used instead of the "
                       "model's own"),
    )
    generation_config: str = field(
        default="auto",
        metadata=_help("auto: sampling defaults (temperature, top_p, top_k, ...) for "
                       "requests that set none come from the model's generation_config.json "
                       "(the default model: temperature 0.2, top_p 0.9); none: the API's "
                       "own defaults (temperature 1.0)"),
    )
    max_open_requests: int = field(
        default=4096,
        metadata=_help("requests open on the gateway; past it clients get HTTP 429 / "
                       "RESOURCE_EXHAUSTED"),
    )
    max_streams_per_connection: int = field(
        default=256,
        metadata=_help("Generate streams open at once on one gRPC client connection; past "
                       "it RESOURCE_EXHAUSTED"),
    )
    num_gateways: int = field(
        default=1,
        metadata=_help("gateway processes sharing the public ports (SO_REUSEPORT: each "
                       "new connection goes to one); more than one where a single one's "
                       "streaming bounds throughput (a small model on a fast GPU)"),
    )
    num_tokenizers: int = field(
        default=2,
        metadata=_help("tokenizer replicas (processes); 0 only for a model without a "
                       "tokenizer (random weights: token ids in and out)"),
    )
    device: str = _same_as(SchedulerServerConfig, "device")
    dtype: str = _same_as(SchedulerServerConfig, "dtype")
    block_size: int = _same_as(SchedulerServerConfig, "block_size")
    max_num_seqs: int = _same_as(SchedulerServerConfig, "max_num_seqs")
    max_num_batched_tokens: int = _same_as(SchedulerServerConfig, "max_num_batched_tokens")
    max_model_len: int | None = _same_as(SchedulerServerConfig, "max_model_len")
    kv_cache_memory: int | None = _same_as(SchedulerServerConfig, "kv_cache_memory")
    gpu_memory_utilization: float = _same_as(SchedulerServerConfig, "gpu_memory_utilization")
    kv_cache_dtype: str = _same_as(SchedulerServerConfig, "kv_cache_dtype")
    attention_backend: str = _same_as(SchedulerServerConfig, "attention_backend")
    cuda_graphs: bool = _same_as(SchedulerServerConfig, "cuda_graphs")
    quantization: str = _same_as(SchedulerServerConfig, "quantization")
    tensor_parallel_size: int = _same_as(SchedulerServerConfig, "tensor_parallel_size")
    policy: str = _same_as(SchedulerServerConfig, "policy")
    async_scheduling: bool = _same_as(SchedulerServerConfig, "async_scheduling")
    enable_prefix_caching: bool = _same_as(SchedulerServerConfig, "enable_prefix_caching")
    max_waiting: int = _same_as(SchedulerServerConfig, "max_waiting")
    max_waiting_tokens: int = _same_as(SchedulerServerConfig, "max_waiting_tokens")
    step_timeout: float | None = _same_as(SchedulerServerConfig, "step_timeout")
    heartbeat_timeout: float = field(
        default=10.0,
        metadata=_help("seconds of silence from the gateway after which the scheduler "
                       "aborts its requests (it sends a heartbeat every second)"),
    )
    scheduler_timeout: float = field(
        default=5.0,
        metadata=_help("seconds of silence from the scheduler after which the gateway ends "
                       "open streams with UNAVAILABLE and health turns NOT_SERVING"),
    )
    grace_seconds: float = field(
        default=30.0,
        metadata=_help("on SIGTERM or Ctrl-C, seconds in-flight streams get to finish"),
    )
    run_dir: str | None = field(
        default=None,
        metadata=_help("directory of the internal unix sockets; default a fresh temporary "
                       "one, removed at exit"),
    )
    replicas: int = field(
        default=1,
        metadata=_help("engine replicas (a scheduler with its executor ranks each) behind "
                       "the gateway, each with its own KV cache"),
    )
    routing_policy: str = field(
        default="auto",
        metadata=_help("the gateway's choice of replica: cache_aware, least_loaded, "
                       "round_robin, or auto (cache_aware with prefix caching, else "
                       "least_loaded)"),
    )
    cluster: str = field(
        default="local",
        metadata=_help("where the engine replicas run: local (processes on this machine) or "
                       "ray (actors on a running Ray cluster, `ray start --head`; needs "
                       "pip install 'tessera[ray]'); the gateway and tokenizers stay here"),
    )
    ray_address: str | None = field(
        default=None,
        metadata=_help("--cluster ray: the cluster to join (as ray.init's address, e.g. "
                       "10.0.0.5:6379); none: RAY_ADDRESS, else the cluster this machine "
                       "belongs to"),
    )
    ray_namespace: str = field(
        default="tessera",
        metadata=_help("--cluster ray: the Ray namespace of the replicas' actors"),
    )
    ray_num_cpus: float = field(
        default=1.0,
        metadata=_help("--cluster ray: CPUs each engine replica reserves from Ray (its "
                       "placement group holds them, with its devices)"),
    )

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        if not self.ray_num_cpus > 0:
            raise ValueError(f"ray_num_cpus must be > 0, got {self.ray_num_cpus}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.num_gateways < 1:
            raise ValueError(f"num_gateways must be >= 1, got {self.num_gateways}")
        if self.routing_policy != "auto":
            from tessera.services.routing import RoutingPolicy

            RoutingPolicy.parse(self.routing_policy)
        if self.num_tokenizers < 0:
            raise ValueError(f"num_tokenizers must be >= 0, got {self.num_tokenizers}")
        if self.generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_CHOICES}, "
                             f"got {self.generation_config!r}")
        # 0 only for a model without a tokenizer (random weights): token ids in and out.


# The launcher's own settings; every other field goes to the stage(s) that read it.
LAUNCHER_FIELDS = ("num_gateways", "num_tokenizers", "run_dir", "api_key", "replicas",
                   "routing_policy", "cluster", "ray_address", "ray_namespace", "ray_num_cpus")
GATEWAY_FIELDS = (
    "model", "served_model_name", "host", "port", "http_port", "tls_cert_file",
    "tls_key_file", "tls_client_ca_file", "generation_config",
    "max_open_requests", "max_streams_per_connection", "heartbeat_timeout",
    "scheduler_timeout", "grace_seconds",
)  # fmt: skip
TOKENIZER_FIELDS = ("model", "chat_template")
SCHEDULER_FIELDS = tuple(
    name for name in SchedulerServerConfig.__dataclass_fields__
    if name in ServeConfig.__dataclass_fields__
)


def preflight(config: ServeConfig) -> None:
    """What would fail after loading, checked before anything starts: the model names
    something, the files exist, the public ports are free. ConfigError (or the model
    registry's ValueError) names the setting."""
    resolve_model(config.model)
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        check_readable_file(getattr(config, name), flag_name(name))
    check_ports_differ((("--port", config.port), ("--http-port", config.http_port)))
    check_port_free(config.host, config.port, "--port (gRPC)")
    if config.http_port:
        check_port_free(config.host, config.http_port, "--http-port (HTTP)")
    if config.tensor_parallel_size != 1:  # a split the model refuses, before any process
        from tessera.executor.parallel import check_splittable, read_model_config

        check_splittable(read_model_config(resolve_model(config.model)),
                         config.tensor_parallel_size)


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
        if self.proc.returncode == EXIT_CONFIG:
            return False  # a bad setting: a restart would fail the same way
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
    commands = [
        (f"tokenizer-{i}",
         py + ["tessera.tokenizer_svc", *_flags(config, TOKENIZER_FIELDS, none=False),
               "--address", addr])
        for i, addr in enumerate(tok_addrs)
    ]
    for name, sched_addr, exec_addr in zip(names, sched_addrs, exec_addrs, strict=True):
        commands.append((
            name,
            py + ["tessera.scheduler", *_flags(config, SCHEDULER_FIELDS),
                  "--gateway-address", sched_addr, "--executor-address", exec_addr],
        ))  # fmt: skip
    gateway = py + ["tessera.services", *_flags(config, GATEWAY_FIELDS),
                    "--scheduler-address", ",".join(sched_addrs), "--routing-policy", policy,
                    "--tokenizer-addresses", ",".join(tok_addrs)]  # fmt: skip
    if config.num_gateways == 1:
        commands.append(("gateway", gateway))
    else:  # the same ports, shared
        commands += [(f"gateway-{g}", [*gateway, "--reuse-port"])
                     for g in range(config.num_gateways)]  # fmt: skip
    return commands


def is_gateway(name: str) -> bool:
    """Whether a child of ``child_commands`` is a gateway (one, or one of several)."""
    return name == "gateway" or name.startswith("gateway-")


def _flags(config: ServeConfig, names: tuple[str, ...], none: bool = True) -> list[str]:
    """``names``' values as the flags of a stage's command line: every one, so that the
    child's environment cannot change what the launcher chose; files as absolute paths.
    ``none``: the stage reads ``none`` as None (common.cli_args); else a None is left out."""
    flags: list[str] = []
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool):
            flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        elif isinstance(value, tuple):
            if value:
                flags += [flag_name(name), *value]
        elif value is None:
            if none:
                flags += [flag_name(name), "none"]  # not absent: the stage's default may differ
        else:
            if isinstance(value, str) and (name.endswith("_file") or name == "chat_template"):
                value = os.path.abspath(value) if os.path.isfile(value) else value
            text = str(value)
            # one token when the value could read as a flag
            flags += [f"{flag_name(name)}={text}"] if text.startswith("-") else [
                flag_name(name), text]
    return flags


def child_env(
    name: str, config: ServeConfig, environ: dict[str, str] | None = None
) -> dict[str, str] | None:
    """The gateway gets the API key in its environment; engine replica r of several gets
    its own devices (CUDA_VISIBLE_DEVICES); the others inherit ours."""
    environ = dict(os.environ if environ is None else environ)
    if is_gateway(name) and config.api_key is not None:
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
    """Check, start, supervise; the exit code: 0 after a clean stop, EXIT_CONFIG for a
    configuration error (found before anything starts, or by a child), 1 otherwise.
    With ``cluster="ray"`` the engine replicas are Ray actors (tessera.ray_serve)."""
    setup_logging("launcher")
    cluster = None
    try:
        preflight(config)
        if config.cluster == "ray":
            from tessera.ray_serve import RayReplicas

            cluster = RayReplicas.connect(config)
    except ValueError as e:  # ConfigError, or a model that names nothing: one line
        logger.error("%s", e)
        return EXIT_CONFIG
    try:
        if config.run_dir is not None:
            os.makedirs(config.run_dir, exist_ok=True)
            return _run(config, config.run_dir, cluster)
        # A run directory of our own goes with us: once every child has stopped, its
        # sockets are dead files that nobody else may use.
        run_dir = tempfile.mkdtemp(prefix="tessera-")
        try:
            return _run(config, run_dir, cluster)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if cluster is not None:
            cluster.close()


class EngineCluster(Protocol):
    """Engine replicas that cluster software places (tessera.ray_serve.RayReplicas)."""

    def start(
        self, run_dir: str, commands: list[tuple[str, list[str]]], scheduler_flags: list[str]
    ) -> list[tuple[str, list[str]]]:
        """Ask for the replicas (schedulers with these flags); of ``commands`` (one local
        replica's), those of the processes that run here."""
        ...

    def check(self) -> int | None:
        """Called every tick: None, or the exit code to stop with."""
        ...


def _run(config: ServeConfig, run_dir: str, cluster: EngineCluster | None = None) -> int:
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: list[_Child] = []
    # Every environment first: a setting at fault stops us before any child starts.
    if cluster is None:
        named = child_commands(config, run_dir)
    else:
        named = cluster.start(run_dir, child_commands(replace(config, replicas=1), run_dir),
                              _flags(config, SCHEDULER_FIELDS))
    commands = [(name, cmd, child_env(name, config)) for name, cmd in named]
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
    cluster_code = None
    while not stopping:
        if cluster is not None:
            cluster_code = cluster.check()
            if cluster_code is not None:
                break
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
    if cluster_code is not None:
        return cluster_code
    if failed is not None:
        return EXIT_CONFIG if failed.proc.returncode == EXIT_CONFIG else 1
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        logger.error("children exited with errors: %s", bad)
        return 1
    logger.info("all processes stopped cleanly")
    return 0


def _shutdown(children: list[_Child], grace: float) -> dict[str, int]:
    """Gateway first (it drains the streams), then the engine and the tokenizers."""
    gateway = [c for c in children if is_gateway(c.name)]
    rest = [c for c in children if not is_gateway(c.name)]
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
