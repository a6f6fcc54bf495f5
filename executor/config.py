"""Executor settings: which model, on which device, in which dtype, and how big a KV pool."""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "triton")
KV_CACHE_DTYPES = ("auto", "fp8")
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
    show_progress: bool = True

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
