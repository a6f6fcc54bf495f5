"""W4A16 GEMM: ``out = x @ W`` with W stored as 4-bit codes, dequantized in registers.

DESIGN. One weight layout serves GPTQ and AWQ checkpoints (``executor.weights.quant``
converts both to it once, at load):

    qweight [K/8, N] int32   word (i, n), nibble j (bits 4j..4j+3) = code of input row 8i + j
    scales  [G, N]   float   G = K / group_size groups of consecutive input rows
    zeros   [G, N]   uint8   zero point per group and column (None: 8, symmetric)
    perm    [K]      int32   act-order: input row i of W multiplies x[:, perm[i]] (or None)

    W[i, n] = (code[i, n] - zeros[i // group_size, n]) * scales[i // group_size, n]

Act-order checkpoints (GPTQ ``desc_act``) scatter a group's rows over K; the loader
sorts the rows by group once, and the kernel reads the activation columns through
``perm`` instead, so a K tile never straddles two groups (BLOCK_K divides the group).

Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), S)``. Split ``s`` covers the K tiles
``[s * T, (s + 1) * T)``; with ``S = 1`` the program writes ``out`` (bias added), else
each split writes float32 partials to a workspace ``[S, M, N]`` and a second kernel sums
them in a fixed order (deterministic, unlike atomics) and adds the bias. Split-K is for
small M (decode), where ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` tiles alone would leave
most multiprocessors idle while the weights stream from memory.

Two inner loops: with ``BLOCK_M == 1`` (one row, a decode step of batch 1) a GEMV that
multiplies in float32 on the CUDA cores and sums over the tile's K rows; otherwise
``tl.dot`` on dequantized tiles in the activation dtype (float32 accumulation). Codes
become floats by the exponent trick, ``bits(0x4B000000 | q) = 2**23 + q`` exactly, which
costs one OR instead of an int-to-float conversion (a quarter-rate instruction).

For large M a fused kernel competes with cuBLAS on tensor-core efficiency; there
``dequantize_w4`` writes W once in the activation dtype (rows back in input order) and the
caller multiplies with torch: about 2.5 bytes moved per weight, small beside the GEMM.
``w4a16_matmul`` picks that path from ``dequant_min_m`` rows up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import check_devices, check_out, check_tensor
from tessera.kernels._paged_common import _dot, dot_mode, num_sms

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PACK = 8  # 4-bit codes per int32 word
SYMMETRIC_ZERO = 8  # the implied zero point when a checkpoint stores none
# From this many rows up, dequantize W and let torch (cuBLAS) multiply. H200, 2026-12-05,
# benchmarks/w4a16.py on the 8B layer shapes: dequantize + mm was faster than this kernel
# on every shape from M = 64 on (qkv 35 vs 48 us, down 83 vs 108 us at M = 64; 0.90-0.94
# of bf16 at M = 4096), the kernel faster at M = 16 (qkv 27 vs 34 us).
DEQUANT_MIN_M = 64


@dataclass(slots=True, frozen=True)
class W4Config:
    """Tile shape of one launch. ``block_k`` must divide the group size; ``split_k``
    0 picks the split from the device's multiprocessor count."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


@triton.jit
def _codes_to_float(words, shifts):
    # words: int32 [.., BN], shifts: int32 [BK, 1] -> float32 2**23 + code, exactly.
    q = (words >> shifts) & 0xF
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K]
    qw_ptr,  # [K/8, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N] uint8, read when HAS_ZEROS
    perm_ptr,  # [K] int32, read when HAS_PERM
    bias_ptr,  # [N], read when HAS_BIAS and not SPLIT
    out_ptr,  # [M, N]; with SPLIT the fp32 workspace [S, M, N]
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    group_size,  # a multiple of BLOCK_K
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    stride_os,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Grouped ordering: GROUP_M row tiles share each column tile while it is in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    arange_k = tl.arange(0, BLOCK_K)
    shifts = ((arange_k % 8) * 4)[:, None]  # nibble of row k in its word; tiles start at 8k

    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + arange_k
        mask_k = offs_k < k_end
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        words = tl.load(
            qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )  # [BK, BN]: each word read for its 8 rows, from L1 after the first
        biased = _codes_to_float(words, shifts)  # [BK, BN]: 2**23 + code
        group = k0 // group_size  # one group per tile: BLOCK_K divides group_size
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0)
            zero = zero.to(tl.float32) + 8388608.0  # 2**23 + zero point
        else:
            zero = tl.full((BLOCK_N,), 8388608.0 + 8.0, dtype=tl.float32)
        centered = biased - zero[None, :]  # code - zero, exact
        if BLOCK_M == 1:
            a = tl.load(x_rows + cols[:, None], mask=mask_m[:, None] & mask_k[:, None], other=0.0)
            # a: [BK, 1]; the scale is one per column in this tile, applied after the sum.
            acc += tl.sum(a.to(tl.float32) * centered, axis=0) * scale.to(tl.float32)
        else:
            a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = (centered * scale.to(tl.float32)[None, :]).to(a.dtype)
            acc += _dot(a, w, PRECISION, UPCAST)

    if BLOCK_M == 1:
        out = acc[None, :]
    else:
        out = acc
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None] * stride_om
    if SPLIT:
        tl.store(out_ptr + split.to(tl.int64) * stride_os + rows + offs_n[None, :], out, mask=mask)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            out += bias.to(tl.float32)[None, :]
        tl.store(out_ptr + rows + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(
    part_ptr,  # [S, M, N] fp32
    bias_ptr,
    out_ptr,  # [M, N]
    N,
    num_splits,
    stride_ps,
    stride_pm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(num_splits):  # in order: the same sum on every run
        acc += tl.load(part_ptr + s * stride_ps + row * stride_pm + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    out_ptr,  # [K, N], row perm[i] gets W row i
    N,
    K,
    group_size,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_ok,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :], mask=mask)
    biased = _codes_to_float(words, ((offs_k % 8) * 4)[:, None])
    groups = (offs_k // group_size)[:, None]
    scale = tl.load(scales_ptr + groups * stride_sg + offs_n[None, :], mask=mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + groups * stride_zg + offs_n[None, :], mask=mask, other=0)
        zero = zero.to(tl.float32) + 8388608.0
    else:
        zero = 8388608.0 + 8.0
    w = (biased - zero) * scale.to(tl.float32)
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        rows = offs_k
    dst = out_ptr + rows.to(tl.int64)[:, None] * stride_ok + offs_n[None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask)


def _check_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
) -> tuple[int, int, int]:
    """(K, N, rows per group) of a checked 4-bit weight; raises ValueError naming the problem."""
    check_tensor("qweight", qweight, 2, (torch.int32,), unit_last_stride=True)
    check_tensor("scales", scales, 2, SCALE_DTYPES, unit_last_stride=True)
    k = qweight.shape[0] * PACK
    n = qweight.shape[1]
    if group_size != -1 and (group_size < 16 or group_size % 16):
        raise ValueError(f"group_size must be -1 or a positive multiple of 16, got {group_size}")
    group = k if group_size == -1 else group_size  # -1: one group of every row
    if k % group:
        raise ValueError(f"group_size {group_size} does not divide the input size K = {k}")
    if tuple(scales.shape) != (k // group, n):
        raise ValueError(
            f"scales must be [K / group_size, N] = {(k // group, n)}, got {tuple(scales.shape)}"
        )
    if zeros is not None:
        check_tensor("zeros", zeros, 2, (torch.uint8,), unit_last_stride=True)
        if zeros.shape != scales.shape:
            raise ValueError(
                f"zeros must have the shape of scales {tuple(scales.shape)}, "
                f"got {tuple(zeros.shape)}"
            )
    if perm is not None:
        check_tensor("perm", perm, 1, (torch.int32,), unit_last_stride=True)
        if perm.shape[0] != k:
            raise ValueError(f"perm must have K = {k} entries, got {perm.shape[0]}")
    return k, n, group


def default_config(m: int, n: int, k: int, group: int, device: torch.device) -> W4Config:
    """Tiles by the row count: a GEMV for one row, 16-64-row dot tiles with split-K for
    small M (decode), 64x128 or 128x128 tiles without split for large M."""
    block_k = next((b for b in (128, 64, 32, 16) if group % b == 0), 128)  # 128: one group
    if m == 1:
        return W4Config(1, 64, block_k, num_warps=4, num_stages=4)
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        return W4Config(block_m, 64, min(block_k, 64), num_warps=4, num_stages=4)
    block_m = 64 if m <= 256 else 128
    return W4Config(block_m, 128, min(block_k, 64), split_k=1, num_warps=8, num_stages=3)


def _num_splits(config: W4Config, tiles: int, k_tiles: int, device: torch.device) -> int:
    if config.split_k:
        return max(1, min(config.split_k, k_tiles))
    # About two programs per multiprocessor, with at least 4 K tiles in a split.
    target = -(-2 * num_sms(device) // max(1, tiles))
    return max(1, min(target, k_tiles // 4, 64))


def w4a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K/8, N] int32
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor | None = None,  # [G, N] uint8; None: 8
    perm: torch.Tensor | None = None,  # [K] int32
    group_size: int = -1,
    bias: torch.Tensor | None = None,  # [N]
    *,
    out: torch.Tensor | None = None,  # [M, N], x's dtype
    config: W4Config | None = None,
    dequant_min_m: int | None = DEQUANT_MIN_M,
) -> torch.Tensor:
    """``x @ W (+ bias)`` in x's dtype, W dequantized from 4 bits (see the module docstring).

    ``dequant_min_m``: from this many rows up, dequantize W and multiply with torch
    (None: always the fused kernel). ``config`` overrides the tile heuristic.
    """
    check_tensor("x", x, 2, ACT_DTYPES, unit_last_stride=True)
    k, n, group = _check_weight(qweight, scales, zeros, perm, group_size)
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but the weight has K = {k} input rows")
    if bias is not None:
        check_tensor("bias", bias, 1, ACT_DTYPES, unit_last_stride=True)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have N = {n} entries, got {bias.shape[0]}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check_out("out", out, (m, n), x)
    optional = (("zeros", zeros), ("perm", perm), ("bias", bias))
    extra = {name: t for name, t in optional if t is not None}
    check_devices(_w4a16_kernel, x=x, qweight=qweight, scales=scales, out=out, **extra)
    if m == 0 or n == 0:
        return out
    if dequant_min_m is not None and m >= dequant_min_m and config is None:
        w = dequantize_w4(qweight, scales, zeros, perm, group_size, dtype=x.dtype)
        return torch.addmm(bias, x, w, out=out) if bias is not None else torch.mm(x, w, out=out)

    config = config or default_config(m, n, k, group, x.device)
    if config.block_k % 16 or (group_size != -1 and group % config.block_k):
        raise ValueError(
            f"block_k {config.block_k} must be a multiple of 16 that divides the group size {group}"
        )
    k_tiles = triton.cdiv(k, config.block_k)
    if group_size == -1:
        group = k_tiles * config.block_k  # every tile in group 0, K a tile multiple or not
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits = _num_splits(config, tiles, k_tiles, x.device)
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)  # no split left without work
    split = splits > 1
    target = (
        torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if split else out
    )
    precision, upcast = dot_mode(x.dtype, _w4a16_kernel)
    _w4a16_kernel[(tiles, splits)](
        x,
        qweight,
        scales,
        zeros if zeros is not None else scales,
        perm if perm is not None else qweight,
        bias if bias is not None else scales,
        target,
        m,
        n,
        k,
        tiles_per_split * config.block_k,
        group,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        target.stride(-2),
        target.stride(0) if split else 0,
        HAS_ZEROS=zeros is not None,
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        SPLIT=split,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        PRECISION=precision,
        UPCAST=upcast,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](
            target,
            bias if bias is not None else target,
            out,
            n,
            splits,
            target.stride(0),
            target.stride(1),
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
        )
    return out


def dequantize_w4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = -1,
    *,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:  # [K, N], rows in input order (perm undone)
    """W in ``dtype``, for ``x @ W`` with torch (large M)."""
    k, n, group = _check_weight(qweight, scales, zeros, perm, group_size)
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    extra = {name: t for name, t in (("zeros", zeros), ("perm", perm)) if t is not None}
    check_devices(_dequantize_kernel, qweight=qweight, scales=scales, **extra)
    block_k, block_n = 32, 128
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight,
        scales,
        zeros if zeros is not None else scales,
        perm if perm is not None else qweight,
        out,
        n,
        k,
        group,
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        out.stride(0),
        HAS_ZEROS=zeros is not None,
        HAS_PERM=perm is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out
