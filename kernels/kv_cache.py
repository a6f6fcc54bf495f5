"""Write a step's new keys and values into the paged KV pool.

DESIGN. The pool of one layer is ``k_cache``/``v_cache`` of shape ``[N, B, H_kv, D]``
and token ``t`` goes to slot ``slot_mapping[t] = block_id * B + offset``:

    slot 37, B = 16  ->  k_cache[2, 5, :, :] = k[t]     (37 = 2 * 16 + 5)

One program copies one token's heads (a ``[BLOCK_H, BLOCK_D]`` tile, usually all of
them) for both K and V, casting to the cache dtype in the store. Into a float8 pool
the values are first clamped to its finite range (a cast would make NaN of them) and
rounded to nearest-even on float8's grid with integer arithmetic, so the cast that
follows is exact: the GPU and the interpreter (whose float32 -> float8 cast loses a
carry: 1.9375 -> 1.0) store the same bits as torch's ``.to(torch.float8_e4m3fn)``.
A negative slot
masks the whole row out: padding rows of a CUDA-graph batch write nothing. The grid
is ``(T, cdiv(H_kv, BLOCK_H))``, a function of shapes only; slots are never read on
the host, so out-of-range slots are the caller's bug (the scheduler never makes one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels._attention_checks import (
    FLOAT_DTYPES,
    FP8_MAX,
    INDEX_DTYPES,
    check_devices,
    check_kv_caches,
    check_tensor,
)

_MAX_TILE = 4096  # elements one program copies per tensor: keeps registers modest


@triton.jit
def _round_to_fp8_e4m3(x, FP8_MAX: tl.constexpr):
    """float32 x clamped to float8 e4m3's range and rounded (nearest, ties to even) to
    its grid: 3 mantissa bits for normal values, steps of 2**-9 below 2**-6."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # the last mantissa bit kept: ties go to even
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    r = x * 512.0
    f = tl.floor(r + 0.5)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    f = tl.where(((f - r) == 0.5) & odd, f - 1.0, f)
    return tl.where(tl.abs(x) < 0.015625, f / 512.0, normal)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k_t,
    stride_k_h,
    stride_k_d,
    stride_v_t,
    stride_v_h,
    stride_v_d,
    stride_c_n,
    stride_c_b,
    stride_c_h,
    stride_c_d,
    num_kv_heads,
    head_size,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: the pool is float8 e4m3 (see _round_to_fp8_e4m3)
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < head_size) & (slot >= 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_k_t + h[:, None] * stride_k_h + d[None, :] * stride_k_d,
                mask=mask)
    v = tl.load(v_ptr + t64 * stride_v_t + h[:, None] * stride_v_h + d[None, :] * stride_v_d,
                mask=mask)
    if FP8_MAX > 0:
        k = _round_to_fp8_e4m3(k.to(tl.float32), FP8_MAX)
        v = _round_to_fp8_e4m3(v.to(tl.float32), FP8_MAX)
    dst = block * stride_c_n + offset * stride_c_b
    dst = dst + h[:, None] * stride_c_h + d[None, :] * stride_c_d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [N, B, H_kv, D]
    v_cache: torch.Tensor,  # [N, B, H_kv, D]
    slot_mapping: torch.Tensor,  # [T] int64 or int32; < 0 = skip the row
) -> None:
    """Scatter ``k``/``v`` rows into the caches at ``slot_mapping`` (in place)."""
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    _, block_size, num_kv_heads, head_size = check_kv_caches(k_cache, v_cache)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    num_tokens = k.shape[0]
    if tuple(k.shape[1:]) != (num_kv_heads, head_size):
        raise ValueError(
            f"k/v rows are {tuple(k.shape[1:])} but the cache holds "
            f"[H_kv={num_kv_heads}, D={head_size}]"
        )
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens"
        )
    check_devices(_write_kv_kernel, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                  slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_TILE // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        num_kv_heads,
        head_size,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        FP8_MAX=FP8_MAX if k_cache.dtype == torch.float8_e4m3fn else 0.0,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )

