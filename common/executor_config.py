"""Executor settings: which model, on which device, in which dtype, and how big a KV pool.

``ExecutorConfig`` is what the model runner takes; ``ExecutorServerConfig`` is the executor
process's command line (the runner's fields plus its socket and keys), which the scheduler
builds to start one. Both are torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.common.curve import check_link, check_pair
from tessera.common.registry import DEFAULT_MODEL

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "triton")
KV_CACHE_DTYPES = ("auto", "fp8")
# auto: what the checkpoint's quantization_config says; none: a float checkpoint only;
# gptq / awq: a 4-bit checkpoint of that method (executor/weights/quant.py).
QUANTIZATIONS = ("auto", "none", "gptq", "awq")
DEFAULT_CPU_KV_CACHE_MEMORY = 2 * 1024**3  # bytes


@dataclass(slots=True, frozen=True)
class ExecutorConfig:
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: float32 on the CPU, bfloat16 on CUDA
    block_size: int = 16
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory Tessera may use
    kv_cache_memory: int | None = None  # CPU: bytes for the KV pool (default 2 GiB)
    num_kv_blocks: int | None = None  # override the computed pool size (tests, benchmarks)
    max_num_batched_tokens: int = 2048  # worst-case step, for profiling
    max_num_seqs: int = 256
    # Context of one request; sizes the CUDA graphs' block tables. None: the model's.
    max_model_len: int | None = None
    # auto: the Triton kernels (kernels/) on CUDA, plain torch on the CPU.
    attention_backend: str = "auto"
    # CUDA: replay captured graphs for decode-only steps of up to max_num_seqs rows.
    cuda_graphs: bool = True
    # auto: the model's dtype. fp8: float8 e4m3 (no scale), half the bytes per token,
    # so twice the tokens in the pool and half the KV read per decode step; Triton
    # backend only. Not token-exact against a bf16 cache.
    kv_cache_dtype: str = "auto"
    # 4-bit weights (GPTQ, AWQ): auto | none | gptq | awq, see QUANTIZATIONS.
    quantization: str = "auto"
    show_progress: bool = True
    # Tensor parallel (executor.parallel): this rank of an engine of N, which meet at
    # dist_init_method (torch.distributed: tcp://host:port or file:///path).
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0
    dist_init_method: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.attention_backend not in _BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                f"got {self.quantization!r}"
            )
        if self.kv_cache_dtype == "fp8" and self.attention_backend == "torch":
            raise ValueError("kv_cache_dtype fp8 needs attention_backend triton, not torch")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        check_tensor_parallel(
            self.tensor_parallel_size, self.tensor_parallel_rank, self.dist_init_method
        )


def check_tensor_parallel(size: int, rank: int, init_method: str) -> None:
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"tensor_parallel_rank must be in [0, {size}), got {rank}")
    if size > 1 and not init_method.startswith(("tcp://", "file://")):
        raise ValueError(
            "tensor_parallel_size > 1 needs dist_init_method, tcp://host:port or "
            f"file:///path, got {init_method!r}"
        )


@dataclass(slots=True, frozen=True)
class ExecutorServerConfig:
    executor_address: str = field(
        metadata={"help": "ZeroMQ address of the scheduler's ROUTER socket to connect to"}
    )
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "model name, GGUF file, Hugging Face directory, or random:<shape>"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "CUDA: share of device memory Tessera may use"}
    )
    kv_cache_memory: int | None = field(
        default=None, metadata={"help": "CPU: bytes for the KV pool (default 2 GiB)"}
    )
    num_kv_blocks: int | None = field(
        default=None, metadata={"help": "override the computed KV pool size"}
    )
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "tokens in the largest step (for profiling)"}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "requests in the largest step"})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "context of one request; default min(model context, KV pool tokens)"},
    )
    attention_backend: str = field(
        default="auto", metadata={"help": "auto (triton on CUDA, torch on the CPU), torch, triton"}
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "CUDA: replay captured graphs for decode steps"}
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"help": "auto (the model's dtype) | fp8 (float8 e4m3: twice the tokens "
                  "per byte; Triton backend only)"},
    )
    quantization: str = field(
        default="auto",
        metadata={"help": "4-bit weights: auto (the checkpoint's quantization_config) | none "
                  "(float checkpoints only) | gptq | awq (the checkpoint must say so)"},
    )
    curve_secret_key_file: str | None = field(
        default=None,
        metadata={"help": "CURVE: this executor's key pair (NAME.key_secret); needed, with "
                  "curve_server_key_file, when executor_address is beyond loopback"},
    )
    curve_server_key_file: str | None = field(
        default=None, metadata={"help": "CURVE: the scheduler's public key (NAME.key)"}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "ranks of the engine, one process per device"}
    )
    tensor_parallel_rank: int = field(
        default=0, metadata={"help": "this process's rank; rank 0 returns the sampled tokens"}
    )
    dist_init_method: str = field(
        default="",
        metadata={"help": "where the ranks meet (torch.distributed): tcp://host:port or "
                  "file:///path; needed when tensor_parallel_size > 1"},
    )
    plan_address: str = field(
        default="",
        metadata={"help": "tensor parallel: the scheduler's PUB socket that every rank "
                  "reads the step plans from"},
    )
    plan_topic: str = field(
        default="",
        metadata={"help": "tensor parallel: the topic this group's plans are published "
                  "under (the scheduler draws one per start)"},
    )

    # Never on a command line (``ps`` shows those) nor in a repr (logs): the scheduler
    # passes it in the child's environment, TESSERA_LINK_TOKEN (scheduler/executor_link.py).
    link_token: str = field(
        default="",
        repr=False,
        metadata={"help": "the secret the scheduler drew for this start of an executor it "
                  "starts itself, presented as this executor's ZeroMQ routing id; leave "
                  "it unset for an executor started elsewhere"},
    )

    def __post_init__(self) -> None:
        if len(self.link_token.encode()) > 255 or self.link_token.startswith("\0"):
            raise ValueError("link_token must be at most 255 bytes and not start with NUL")
        if self.tensor_parallel_size > 1 and not self.plan_address:
            raise ValueError("tensor_parallel_size > 1 needs plan_address (the plans' PUB)")
        if not self.executor_address and self.tensor_parallel_rank == 0:
            raise ValueError("executor_address must name the scheduler's socket")
        has_keys = check_pair(
            self.curve_secret_key_file, self.curve_server_key_file,
            "curve_secret_key_file and curve_server_key_file",
        )
        flags = "--curve-secret-key-file and --curve-server-key-file"
        for address in (self.executor_address, self.plan_address):
            if address:
                check_link(address, has_keys, flags)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.runner_config  # noqa: B018 - validates the model runner's fields once, here

    @property
    def runner_config(self) -> ExecutorConfig:
        return ExecutorConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory=self.kv_cache_memory,
            num_kv_blocks=self.num_kv_blocks,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs,
            kv_cache_dtype=self.kv_cache_dtype,
            quantization=self.quantization,
            show_progress=False,
            tensor_parallel_size=self.tensor_parallel_size,
            tensor_parallel_rank=self.tensor_parallel_rank,
            dist_init_method=self.dist_init_method,
        )
