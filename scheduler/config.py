"""Scheduler configuration, each a frozen dataclass validated once when it is built:
``SchedulerConfig`` for the scheduling core, ``SchedulerServerConfig`` for the scheduler
process (its sockets, limits and the settings it passes to the executor it starts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.common.curve import check_link, check_pair
from tessera.common.executor_config import ExecutorServerConfig
from tessera.proto.tessera.v1 import engine_pb2

POLICIES = ("fcfs", "priority", "lpm")
DEFAULT_GATEWAY_ADDRESS = "ipc:///tmp/tessera-scheduler.sock"


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV cache blocks in the pool, as the executor sized it
    block_size: int = 16  # tokens per block
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens run in one step, over all requests
    max_model_len: int = 2048  # prompt plus output tokens of one request
    policy: str = "fcfs"  # "fcfs", "priority" or "lpm" (scheduler/policy.py)
    # Share the K/V of full blocks between requests with the same leading tokens
    # (and cache_salt): kv_cache_manager.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in (
            "num_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            value = getattr(self, name)
            # bool is an int subclass; True blocks would be a typo, not a size
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(
                f"SchedulerConfig.policy must be one of {POLICIES}, got {self.policy!r}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                "SchedulerConfig.enable_prefix_caching must be a bool, got "
                f"{self.enable_prefix_caching!r}"
            )


def _executor_field(name: str):
    """The executor's setting of that name, with its default and help."""
    executor_field = ExecutorServerConfig.__dataclass_fields__[name]
    return field(default=executor_field.default, metadata=executor_field.metadata)


# Settings the scheduler hands to the executor it starts (scheduling ones included).
_PASSED_TO_EXECUTOR = (
    "model", "device", "dtype", "block_size", "gpu_memory_utilization", "kv_cache_memory",
    "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
    "attention_backend", "cuda_graphs", "kv_cache_dtype", "tensor_parallel_size",
    "quantization",
)  # fmt: skip


@dataclass(slots=True, frozen=True)
class SchedulerServerConfig:
    # sockets
    gateway_address: str = field(
        default=DEFAULT_GATEWAY_ADDRESS,
        metadata={"help": "ZeroMQ address the gateways' DEALERs connect to (ROUTER binds)"},
    )
    executor_address: str = field(
        default="",
        metadata={"help": "the ROUTER socket executors connect to; empty: a private ipc path"},
    )
    start_executor: bool = field(
        default=True,
        metadata={
            "help": "start the executor as a child process; with --no-start-executor, "
            "wait for one started elsewhere to connect to executor_address "
            "(one container per stage)"
        },
    )
    executor_start_timeout: float = field(
        default=600.0,
        metadata={"help": "seconds an executor (first or restarted) may take to load"},
    )
    step_timeout: float | None = field(
        default=120.0,
        metadata={
            "help": "seconds one step may run before the executor is deemed hung, killed "
            "and restarted (generous: a first CUDA step may compile kernels); none: no "
            "watchdog"
        },
    )
    max_executor_restarts: int = field(
        default=3,
        metadata={
            "help": "executors started in a row, each lost before completing a step, "
            "before the engine gives up and fails open requests as unavailable (it "
            "keeps trying, with backoff)"
        },
    )
    # scheduling
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_seqs: int = field(default=256, metadata={"help": "requests running at once"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "tokens per step"})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "prompt + output tokens; default min(model context, KV pool)"},
    )
    policy: str = field(
        default="fcfs",
        metadata={
            "help": "fcfs | priority (lower priority values first) | lpm (as priority, "
            "but among equal priorities the longest cached prompt prefix first, "
            "bounded so nothing starves; never preempts for a waiting request)"
        },
    )
    async_scheduling: bool = field(
        default=True,
        metadata={
            "help": "schedule step N+1 while step N runs, so the executor never waits "
            "for the scheduler (a request that stops on EOS costs one wasted decode "
            "row); --no-async-scheduling: one step at a time"
        },
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={
            "help": "automatic prefix caching: requests that start with the same full "
            "blocks of tokens (and cache_salt) share their KV instead of computing it "
            "again; --no-enable-prefix-caching: every prompt is computed in full"
        },
    )
    max_waiting: int = field(
        default=4096, metadata={"help": "waiting sequences; more are rejected as overloaded"}
    )
    max_waiting_tokens: int = field(
        default=1 << 20,
        metadata={
            "help": "tokens of the waiting sequences (prompt, plus output of preempted "
            "ones); a request that would go past it is rejected as overloaded"
        },
    )
    # the executor: passed on to it, each declared once, in ExecutorServerConfig
    model: str = _executor_field("model")
    device: str = _executor_field("device")
    dtype: str = _executor_field("dtype")
    gpu_memory_utilization: float = _executor_field("gpu_memory_utilization")
    kv_cache_memory: int | None = _executor_field("kv_cache_memory")
    num_kv_blocks: int | None = _executor_field("num_kv_blocks")
    attention_backend: str = _executor_field("attention_backend")
    cuda_graphs: bool = _executor_field("cuda_graphs")
    kv_cache_dtype: str = _executor_field("kv_cache_dtype")
    quantization: str = _executor_field("quantization")
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "executor ranks, one process per device, that run each step together "
            "(torch.distributed: NCCL on CUDA, gloo on the CPU)"
        },
    )
    plan_address: str = field(
        default="",
        metadata={
            "help": "tensor parallel: the PUB socket every rank reads the step plans "
            "from; empty: a private ipc path"
        },
    )
    # security of the two sockets (executor.curve)
    curve_secret_key_file: str | None = field(
        default=None,
        metadata={
            "help": "CURVE: this scheduler's key pair (NAME.key_secret); needed, with "
            "curve_authorized_keys, when a socket binds beyond loopback"
        },
    )
    curve_authorized_keys: str | None = field(
        default=None,
        metadata={
            "help": "CURVE: a directory of the public keys (*.key) of the gateways and "
            "executors allowed to connect"
        },
    )

    def __post_init__(self) -> None:
        if not self.gateway_address:
            raise ValueError("gateway_address must not be empty")
        has_keys = check_pair(
            self.curve_secret_key_file,
            self.curve_authorized_keys,
            "curve_secret_key_file and curve_authorized_keys",
        )
        flags = "--curve-secret-key-file and --curve-authorized-keys"
        check_link(self.gateway_address, has_keys, flags)
        for address in (self.executor_address, self.plan_address):
            if address:
                check_link(address, has_keys, flags)
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.max_waiting_tokens < 1:
            raise ValueError(f"max_waiting_tokens must be >= 1, got {self.max_waiting_tokens}")
        if not self.executor_start_timeout > 0:
            raise ValueError(
                f"executor_start_timeout must be > 0 seconds, got {self.executor_start_timeout}"
            )
        if self.step_timeout is not None and not self.step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds (or none), got {self.step_timeout}")
        if self.max_executor_restarts < 0:
            raise ValueError(
                f"max_executor_restarts must be >= 0, got {self.max_executor_restarts}"
            )
        # The knobs the two configs own, checked once here, where the user set them
        # (the pool size comes from the executor later).
        SchedulerConfig(
            num_blocks=1,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len or 2,
            policy=self.policy,
            enable_prefix_caching=self.enable_prefix_caching,
        )
        self.executor_config(self.executor_address or "ipc://unused")

    @property
    def parallel(self) -> bool:
        return self.tensor_parallel_size > 1

    def executor_config(self, address: str) -> ExecutorServerConfig:
        return ExecutorServerConfig(
            executor_address=address,
            **{name: getattr(self, name) for name in _PASSED_TO_EXECUTOR},
            # A child executor authenticates with the scheduler's own key pair.
            curve_secret_key_file=self.curve_secret_key_file,
            curve_server_key_file=self.curve_secret_key_file,
            # Tensor parallel: the link fills in each rank's place and rendezvous.
            plan_address=(self.plan_address or "ipc://unset") if self.parallel else "",
            dist_init_method="file:///unset" if self.parallel else "",
        )

    def scheduler_config(self, info: engine_pb2.EngineInfo) -> SchedulerConfig:
        return SchedulerConfig(
            num_blocks=info.num_kv_blocks,
            block_size=info.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=info.max_model_len,
            policy=self.policy,
            enable_prefix_caching=self.enable_prefix_caching,
        )
