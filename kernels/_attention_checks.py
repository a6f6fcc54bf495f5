"""Argument checks of the attention launchers (``kv_cache``, ``paged_decode``,
``paged_prefill``) on top of the shared ones in ``kernels._checks``.

Every check reads shapes, strides, dtypes and devices only: nothing here looks at a
tensor's contents, so a launcher that calls these stays free of host synchronisation
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from tessera.kernels._checks import FLOAT_DTYPES, check_devices, check_tensor, interpreted

__all__ = [
    "FLOAT_DTYPES",
    "FP8_MAX",
    "INDEX_DTYPES",
    "KV_DTYPES",
    "check_block",
    "check_devices",
    "check_heads",
    "check_kv_caches",
    "check_out",
    "check_scale",
    "check_tables",
    "check_tensor",
    "interpreted",
]

INDEX_DTYPES = (torch.int32, torch.int64)
# The pool may also hold float8 (e4m3, no per-tensor scale, as vLLM's fp8 KV cache with
# scale 1): half the bytes per token. Values are clamped to FP8_MAX when written and
# widened to the query's dtype when read.
KV_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_MAX_HEAD_SIZE = 256


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the paged pool of one layer; returns (num_blocks, block_size, H_kv, D)."""
    check_tensor("k_cache", k_cache, 4, KV_DTYPES)
    check_tensor("v_cache", v_cache, 4, KV_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} differ"
        )
    num_blocks, block_size, num_kv_heads, head_size = k_cache.shape
    if block_size < 1 or num_kv_heads < 1 or head_size < 1:
        raise ValueError(f"empty KV cache dimension in shape {tuple(k_cache.shape)}")
    return num_blocks, block_size, num_kv_heads, head_size


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``out`` if given (same shape, dtype and device as ``like``), else a new tensor."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def check_heads(q: torch.Tensor, num_kv_heads: int, head_size: int) -> None:
    num_heads = q.shape[1]
    if q.shape[2] != head_size:
        raise ValueError(f"q head size {q.shape[2]} differs from the cache's {head_size}")
    if head_size > _MAX_HEAD_SIZE:
        raise ValueError(f"head size {head_size} is above the supported {_MAX_HEAD_SIZE}")
    if num_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads is not a positive multiple of {num_kv_heads} KV heads"
        )


def check_tables(
    block_tables: torch.Tensor, context_lens: torch.Tensor, rows: int, what: str
) -> None:
    check_tensor("block_tables", block_tables, 2, INDEX_DTYPES)
    check_tensor("context_lens", context_lens, 1, INDEX_DTYPES)
    if block_tables.shape[0] != rows or context_lens.shape[0] != rows:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens "
            f"{tuple(context_lens.shape)} must have one row per {what} ({rows})"
        )


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return float(scale)


def check_block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
    return value
