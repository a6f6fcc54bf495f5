"""Argument checks of the attention launchers (``kv_cache``, ``paged_attention``) on top
of the shared ones in ``kernels._checks``.

Every check reads shapes, strides, dtypes and devices only: nothing here looks at a
tensor's contents, so a launcher that calls these stays free of host synchronisation
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from tessera.kernels._checks import FLOAT_DTYPES, check_devices, check_tensor, interpreted

__all__ = [
    "FLOAT_DTYPES",
    "FP8_MAX",
    "INDEX_DTYPES",
    "KV_DTYPES",
    "check_devices",
    "check_kv_caches",
    "check_out",
    "check_tensor",
    "interpreted",
]

INDEX_DTYPES = (torch.int32, torch.int64)
# The pool may also hold float8 (e4m3, no per-tensor scale, as vLLM's fp8 KV cache with
# scale 1): half the bytes per token. Values are clamped to FP8_MAX when written and
# widened to the query's dtype when read.
KV_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


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
