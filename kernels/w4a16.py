"""W4A16 GEMM: ``out = x @ W`` with W stored as 4-bit codes, dequantized in registers.

DESIGN. One weight layout serves GPTQ and AWQ checkpoints (``executor.weights.quant``
converts both to it once, at load):

    qweight [K/8, N] int32   word (i, n), nibble j (bits 4j..4j+3) = code of input row 8i + j
    scales  [G, N]   float   G = K / group_size groups of consecutive input rows
    zeros   [G, N]   uint8   zero point per group and column (None: 8, symmetric)
    perm    [K]      int32   act-order: input row i of W multiplies x[:, perm[i]] (or None)

    W[i, n] = (code[i, n] - zeros[i // group_size, n]) * scales[i // group_size, n]

Act-order checkpoints (GPTQ ``desc_act``) scatter a group's rows over K; the loader
sorts the rows by group once, and the kernels read the activation columns through
``perm`` instead, so a K tile never straddles two groups (BLOCK_K divides the group), or
(tensor-core kernel) holds whole groups.

Grid ``(tiles, S)``. Split ``s`` covers the K tiles ``[s * T, (s + 1) * T)``; with
``S = 1`` the program writes ``out`` (bias added), else each split writes float32
partials to a workspace ``[S, M, N]``. Split-K is for small M (decode), where the output
tiles alone would leave most multiprocessors idle while the weights stream from memory.
The splits are summed in a fixed order (deterministic, unlike atomics) by a second
kernel, ``_sum_splits_kernel``, or, with ``fixup``, by the split that finishes last: each
split counts itself in on a per-tile counter (release/acquire), and the one that sees
``S - 1`` earlier arrivals reads the workspace back, writes ``out`` and resets the counter
to 0 for the next launch. That saves the launch of a second kernel (about a microsecond
in a CUDA graph, a large share of a 10 us decode GEMM), but its memory ordering has only
been checked under the interpreter so far, so it stays off until a GPU run of
``benchmarks/w4a16.py --sweep`` (which checks every config's result) measures it. The
counters are one zeroed buffer per device: two fixup launches must not run concurrently
on two streams.

Three kernels; all turn codes into floats by the exponent trick,
``bits(0x4B000000 | q) = 2**23 + q`` exactly for ``0 <= q < 2**23``: one OR and one
subtraction instead of an int-to-float conversion (a quarter-rate instruction).

With one row (a decode step of batch 1) ``_w4a16_gemv_kernel`` reads a
``[BLOCK_K / 8, BLOCK_N]`` tile of words, each word once with 16-byte loads along N, and
multiplies on the CUDA cores in float32, one nibble plane (rows 8i + j of the tile) at a
time. The exponent bits go into each word once, then one AND per nibble makes a float::

    low  = (words & 0xFFFFF)       | 0x4B000000       nibbles 0..4
    high = ((words >> 20) & 0xFFF) | 0x4B000000       nibbles 5..7, at bits 0, 4, 8
    bits(low & (0x4B000000 | 0xF << 4j)) = 2**23 + code * 16**j     (code * 16**j < 2**20)

Subtracting ``2**23 + zero * 16**j`` leaves ``(code - zero) * 16**j`` exactly, and the
activation of plane j is pre-scaled by ``16**-j`` (a power of two: exact), so a nibble
costs one AND, one subtraction and one FMA. The scale multiplies once per group and
column; the tile's rows are summed once, after the K loop.

With more rows the product runs on tensor cores (``tl.dot``) on tiles dequantized in the
activation dtype, float32 accumulation. The first dot kernel, ``_w4a16_kernel``
(``kernel="dot"``): with ``BLOCK_K >= 128`` (``planes``) it reads ``[BLOCK_K / 8,
BLOCK_N]`` words once and runs eight dots of depth ``BLOCK_K / 8``, nibble plane j against
activation columns ``k0 + 8i + j``; otherwise it loads each word once for each of its 8
rows, which costs 8x the load instructions and, through ``cp.async`` (which bypasses L1),
8x the L2 traffic and shared memory. Measured on the H200 at 16-64 rows: 0.40-0.91x of
bf16's speed. Compiled for sm_90 and read, the planes variant loads its strided
activation columns outside the pipeline (2-byte loads that ``cp.async`` cannot take),
and the per-row variant holds four stages of 8x-repeated words in 180 KB of shared
memory at 64 rows: one program per multiprocessor.

The tensor-core kernel, ``_w4a16_tc_kernel`` (``kernels/_w4a16_tc.py``, ``kernel="tc"``),
is the one meant for 16-256 rows: it reads a ``[BLOCK_K / 8, BLOCK_N]`` tile of words once
(``cp.async``, ``num_stages`` deep, like the contiguous activation tile), dequantizes its
eight nibble planes in registers (the GEMV's exponent trick: one AND, one subtraction,
one multiplication per weight), joins them back into row order inside each thread and
runs one dot of depth ``BLOCK_K``. At 16-64 rows (one row tile) the 4-bit weights are
most of the traffic, and its sm_90 loop issues 4.5-7 instructions per weight, 3-4 of
them the dequantization, which should leave it faster than bf16's 2 bytes per weight
(not yet measured); from 128 rows the dequantization repeats per row tile and the tensor
cores start to count, and whether it beats dequantize + mm is the sweep's to say. ``swap``
multiplies ``W^T @ x^T`` instead (the weight tile as the first operand, in registers on
sm_90); ``scale_after`` (a tile within one group) dequantizes to ``code - zero`` with one
FMA per weight and scales the tile's dot result instead; groups smaller than the tile
(32, 64 with ``BLOCK_K = 128``) read one scale row per word row.

For large M a fused kernel competes with cuBLAS on tensor-core efficiency; there
``dequantize_w4`` writes W once in the activation dtype (rows back in input order) and the
caller multiplies with torch: about 2.5 bytes moved per weight, small beside the GEMM,
but a full pass over W per call, which at 64-256 rows costs about as much as the GEMM.
``w4a16_matmul`` takes that path from ``DEQUANT_MIN_M`` (1024) rows up; below it, a
shape and rows bucket with tiles in ``TUNED`` runs the fused kernel, and one without
dequantizes from ``UNTUNED_DEQUANT_MIN_M`` (64) rows up (``uses_dequant_mm``).
``benchmarks/w4a16.py --sweep`` times both per bucket and keeps a key in ``TUNED`` only
where the fused kernel won, so the table is also the record of which path is faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import check_devices, check_out, check_tensor
from tessera.kernels._paged_common import _dot, dot_mode, num_sms
from tessera.kernels._w4a16_common import _finish, _group_row, _load_words, _tile_coords
from tessera.kernels._w4a16_tc import _w4a16_tc_kernel

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PACK = 8  # 4-bit codes per int32 word
SYMMETRIC_ZERO = 8  # the implied zero point when a checkpoint stores none
# From this many rows up every GEMM dequantizes W and lets torch (cuBLAS) multiply: the
# product is compute-bound there and the dequantization a small share of it (H200,
# 2026-12-05: 0.90-0.94 of bf16's speed at 4096 rows).
DEQUANT_MIN_M = 1024
# Below DEQUANT_MIN_M, a shape with no TUNED tiles for its rows bucket (never swept, or
# swept and slower than dequantize + mm) dequantizes from this many rows up. The first
# H200 sweep (2026-12-05, the dot kernel): dequantize + mm won on every 8B shape from 128
# rows, and at 64 rows on qkv and o (the fused kernel won on gate_up and down).
UNTUNED_DEQUANT_MIN_M = 64
KERNELS = ("dot", "tc")  # W4Config.kernel, for two rows or more


@dataclass(slots=True, frozen=True)
class W4Config:
    """Tile shape of one launch. ``block_m == 1`` (one row only) runs the GEMV kernel;
    ``block_k`` must divide the group size (``kernel="tc"``: or be a multiple of it);
    ``split_k`` 0 picks the split from the device's multiprocessor count
    (``programs_per_sm`` programs per multiprocessor); ``fixup`` sums the splits in the
    last split's program rather than a second kernel. ``kernel`` (two rows or more):
    ``"dot"`` is ``_w4a16_kernel``, where ``planes`` (``block_k >= 128``) reads each word
    once and multiplies its eight nibble planes separately, instead of reading each word
    for each of its rows; ``"tc"`` is ``_w4a16_tc_kernel``, one dot of depth ``block_k``
    per tile, with ``swap`` computing ``W^T @ x^T`` (the weight tile as first operand) and
    ``scale_after`` multiplying each tile's dot result by its group's scales instead of
    each weight (where a tile holds one group; ignored where it holds several)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    programs_per_sm: int = 4
    fixup: bool = False
    planes: bool = True
    kernel: str = "dot"
    swap: bool = False
    scale_after: bool = False


@triton.jit
def _codes_to_float(words, shifts):
    # words: int32 [.., BN], shifts: int32 [BK, 1] -> float32 2**23 + code, exactly.
    q = (words >> shifts) & 0xF
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [K]: the one activation row
    qw_ptr,  # [K/8, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N] uint8, read when HAS_ZEROS
    perm_ptr,  # [K] int32, read when HAS_PERM
    bias_ptr,  # [N], read when HAS_BIAS
    out_ptr,  # [1, N]
    part_ptr,  # [S, 1, N] fp32, with SPLIT
    lock_ptr,  # [cdiv(N, BLOCK_N)] int32, with FIXUP
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    group_size,  # a multiple of BLOCK_K
    stride_qk,
    stride_sg,
    stride_zg,
    stride_ps,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_W: tl.constexpr = BLOCK_K // 8  # words per column in a tile
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Per-row partial sums; the rows are summed once, after the loop.
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        word_rows, mask_w, words = _load_words(qw_ptr, k0, k_end, offs_n, mask_n, stride_qk,
                                               BLOCK_W)  # fmt: skip
        # The exponent bits of 2**23 ORed in once per word, then one AND per nibble:
        # nibbles 0..4 (bits 0..19) from `low`, 5..7 from `high` (shifted down by 20).
        low = (words & 0xFFFFF) | 0x4B000000
        high = ((words >> 20) & 0xFFF) | 0x4B000000
        # One group per tile: BLOCK_K divides group_size.
        scale, zero = _group_row(scales_ptr, zeros_ptr, k0 // group_size, offs_n, mask_n,
                                 stride_sg, stride_zg, HAS_ZEROS)  # fmt: skip
        part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            pos = 4 * (j % 5)  # bit of nibble j in src
            if j < 5:
                src = low
            else:
                src = high
            cols = word_rows * 8 + j
            if HAS_PERM:
                cols = tl.load(perm_ptr + cols, mask=mask_w, other=0)
            a = tl.load(x_ptr + cols, mask=mask_w, other=0.0).to(tl.float32)
            a = a * (1.0 / (1 << pos))  # x / 16**(pos / 4), exact
            biased = (src & (0x4B000000 | (0xF << pos))).to(tl.float32, bitcast=True)
            w = biased - (zero * (1 << pos) + 8388608.0)[None, :]  # (code - zero) << pos
            part += w * a[:, None]
        acc += part * scale[None, :]
    out = tl.sum(acc, axis=0)[None, :]  # [1, BN]
    offs_m = tl.arange(0, 1)
    _finish(out, offs_m, offs_n, offs_m < 1, mask_n, pid_n, out_ptr, part_ptr, lock_ptr,
            bias_ptr, 0, 0, stride_ps, HAS_BIAS, SPLIT, FIXUP)  # fmt: skip


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K]
    qw_ptr,  # [K/8, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N] uint8, read when HAS_ZEROS
    perm_ptr,  # [K] int32, read when HAS_PERM
    bias_ptr,  # [N], read when HAS_BIAS
    out_ptr,  # [M, N]
    part_ptr,  # [S, M, N] fp32, with SPLIT
    lock_ptr,  # [tiles] int32, with FIXUP
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
    stride_pm,
    stride_ps,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
    PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = _tile_coords(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    arange_k = tl.arange(0, BLOCK_K)
    shifts = ((arange_k % 8) * 4)[:, None]  # nibble of row k in its word; tiles start at 8k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        group = k0 // group_size  # one group per tile: BLOCK_K divides group_size
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
        scale = scale.to(tl.float32)[None, :]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0)
            zero = zero.to(tl.float32)[None, :] + 8388608.0  # 2**23 + zero point
        else:
            zero = 8388608.0 + 8.0
        if PLANES:
            # Each word read once; nibble plane j (rows 8i + j of the tile) is a dot of
            # its own with the activation columns k0 + 8i + j.
            word_rows, mask_w, words = _load_words(qw_ptr, k0, k_end, offs_n, mask_n,
                                                   stride_qk, BLOCK_K // 8)  # fmt: skip
            for j in tl.static_range(8):
                cols = word_rows * 8 + j
                if HAS_PERM:
                    cols = tl.load(perm_ptr + cols, mask=mask_w, other=0)
                a = tl.load(
                    x_rows + cols[None, :], mask=mask_m[:, None] & mask_w[None, :], other=0.0
                )
                w = ((_codes_to_float(words, 4 * j) - zero) * scale).to(a.dtype)
                acc += _dot(a, w, PRECISION, UPCAST)
        else:
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
            a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = ((_codes_to_float(words, shifts) - zero) * scale).to(a.dtype)  # code - zero, exact
            acc += _dot(a, w, PRECISION, UPCAST)

    _finish(acc, offs_m, offs_n, mask_m, mask_n, pid, out_ptr, part_ptr, lock_ptr, bias_ptr,
            stride_om, stride_pm, stride_ps, HAS_BIAS, SPLIT, FIXUP)  # fmt: skip


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


# Tiles measured fastest for Llama-3.1-8B's layers (group 128), keyed by (rows bucket, K,
# N); other shapes take the heuristic. One row: H200, ``benchmarks/w4a16.py --sweep 70``
# (2026-12-05, results/w4a16_h200.json); 16-256 rows (the tensor-core kernel): H100,
# ``--sweep 150`` (2026-12-07, results/w4a16_tc_h100.json). A key is kept only where the
# fused kernel beat dequantize + mm at that many rows (at 256 rows: gate_up only), and
# its presence is what sends a bucket of UNTUNED_DEQUANT_MIN_M rows or more to the kernel.
TUNED: dict[tuple[int, int, int], W4Config] = {
    (1, 4096, 4096): W4Config(1, 128, 128, fixup=True),
    (1, 4096, 6144): W4Config(1, 128, 128, fixup=True),
    (1, 4096, 28672): W4Config(1, 64, 128, num_warps=2, programs_per_sm=16),
    (1, 14336, 4096): W4Config(1, 128, 128, fixup=True),
    (16, 4096, 4096): W4Config(16, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (16, 4096, 6144): W4Config(16, 256, 128, 0, 8, programs_per_sm=2, kernel="tc", swap=True),
    (16, 4096, 28672): W4Config(16, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (16, 14336, 4096): W4Config(16, 256, 128, 0, 8, programs_per_sm=2, kernel="tc", swap=True),
    (32, 4096, 4096): W4Config(32, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (32, 4096, 6144): W4Config(32, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (32, 4096, 28672): W4Config(32, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (32, 14336, 4096): W4Config(32, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (64, 4096, 4096): W4Config(64, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (64, 4096, 6144): W4Config(64, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (64, 4096, 28672): W4Config(64, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (64, 14336, 4096): W4Config(64, 128, 128, programs_per_sm=2, kernel="tc", swap=True),
    (128, 4096, 4096): W4Config(64, 128, 128, programs_per_sm=1, kernel="tc"),
    (128, 4096, 6144): W4Config(128, 64, 128, split_k=1, kernel="tc"),
    (128, 4096, 28672): W4Config(128, 128, 64, split_k=1, num_warps=8, num_stages=4, kernel="tc"),
    (128, 14336, 4096): W4Config(64, 128, 128, programs_per_sm=1, kernel="tc"),
    (256, 4096, 28672): W4Config(128, 128, 64, split_k=1, num_warps=8, num_stages=4, kernel="tc"),
}  # fmt: skip


def rows_bucket(m: int) -> int:
    """The row count ``TUNED`` is keyed by: 1, or the next power of two from 16 up."""
    return 1 if m == 1 else max(16, triton.next_power_of_2(m))


def fits_group(config: W4Config, group: int) -> bool:
    """Whether ``config``'s K tile suits ``group`` rows per group: a tile never straddles
    two groups, or (``kernel="tc"``) holds whole groups."""
    if config.block_k % 16:
        return False
    if group % config.block_k == 0:
        return True
    return config.kernel == "tc" and config.block_m > 1 and config.block_k % group == 0


def default_config(m: int, n: int, k: int, group: int, device: torch.device) -> W4Config:
    """TUNED's tiles for the shape and rows bucket, else by the row count: a GEMV for one
    row, tensor-core tiles of 16-64 rows with split-K for small M (decode), 128x128 tiles
    without split for more rows."""
    tuned = TUNED.get((rows_bucket(m), k, n))
    if tuned is not None and fits_group(tuned, group):
        return tuned
    if m == 1:
        block_k = next((b for b in (128, 64, 32, 16) if group % b == 0), 128)  # 128: one group
        return W4Config(1, 128, block_k, num_warps=4, num_stages=3)
    # Whole groups in a tile are fine here; 128: one group (-1) of a K no power divides.
    block_k = next((b for b in (128, 64, 32, 16) if group % b == 0 or b % group == 0), 128)
    if m <= 64:  # the leanest loop compiled for sm_90 (574-637 instructions / 128 weights)
        return W4Config(rows_bucket(m), 128, block_k, num_warps=4, num_stages=3, kernel="tc",
                        swap=True, scale_after=True)  # fmt: skip
    return W4Config(128, 128, block_k, split_k=1, num_warps=8, num_stages=3, kernel="tc")


def uses_dequant_mm(m: int, n: int, k: int, dequant_min_m: int | None = DEQUANT_MIN_M) -> bool:
    """Whether ``w4a16_matmul`` dequantizes a ``[K, N]`` weight and multiplies with torch at
    ``m`` rows: from ``dequant_min_m`` rows up (None: never); below, from
    ``UNTUNED_DEQUANT_MIN_M`` rows up where ``TUNED`` has no tiles for the shape at m's
    rows bucket. The sweep keeps tiles only where the fused kernel beat dequantize + mm,
    so each bucket runs whichever it measured faster."""
    if dequant_min_m is None:
        return False
    if m >= dequant_min_m:
        return True
    return m >= UNTUNED_DEQUANT_MIN_M and (rows_bucket(m), k, n) not in TUNED


def _num_splits(config: W4Config, tiles: int, k_tiles: int, device: torch.device) -> int:
    if config.split_k:
        return max(1, min(config.split_k, k_tiles))
    # programs_per_sm programs per multiprocessor, with at least 2 K tiles in a split.
    target = -(-config.programs_per_sm * num_sms(device) // max(1, tiles))
    return max(1, min(target, k_tiles // 2, 64))


def _check_config(config: W4Config, m: int, group: int | None) -> None:
    """Raise ValueError where ``config`` cannot run ``m`` rows (``group``: rows per group,
    None for one group of every row)."""
    if config.kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {config.kernel!r}")
    if config.block_m == 1 and m != 1:
        raise ValueError(f"block_m 1 (the GEMV) takes one row, got M = {m}")
    if config.block_k % 16 or (group is not None and not fits_group(config, group)):
        whole = " (or, kernel 'tc', a multiple of it)" if config.kernel == "tc" else ""
        raise ValueError(
            f"block_k {config.block_k} must be a multiple of 16 that divides the group size "
            f"{group}{whole}"
        )


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, count: int) -> torch.Tensor | None:
    """The per-device zeroed arrival counters of the split-K fixup (at least ``count``),
    or None when they would have to grow inside a CUDA graph capture."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        locks = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


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
    (None: always a fused kernel); fewer rows choose by ``uses_dequant_mm``. ``config``
    (a fused kernel's tiles) overrides both the choice and ``TUNED``.
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
    if config is None and uses_dequant_mm(m, n, k, dequant_min_m):
        w = dequantize_w4(qweight, scales, zeros, perm, group_size, dtype=x.dtype)
        return torch.addmm(bias, x, w, out=out) if bias is not None else torch.mm(x, w, out=out)

    config = config or default_config(m, n, k, group, x.device)
    _check_config(config, m, group if group_size != -1 else None)
    k_tiles = triton.cdiv(k, config.block_k)
    if group_size == -1:
        group = k_tiles * config.block_k  # every tile in group 0, K a tile multiple or not
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits = _num_splits(config, tiles, k_tiles, x.device)
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)  # no split left without work
    split = splits > 1
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if split else out
    locks = _locks(x.device, tiles) if split and config.fixup else None
    fixup = locks is not None
    common = dict(
        HAS_ZEROS=zeros is not None,
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        SPLIT=split,
        FIXUP=fixup,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    weight = (
        qweight,
        scales,
        zeros if zeros is not None else scales,
        perm if perm is not None else qweight,
        bias if bias is not None else scales,
        out,
        part,
        locks if fixup else qweight,
    )
    k_per_split = tiles_per_split * config.block_k
    zero_stride = zeros.stride(0) if zeros is not None else 0
    if config.block_m == 1:
        _w4a16_gemv_kernel[(tiles, splits)](
            x, *weight, n, k, k_per_split, group, qweight.stride(0), scales.stride(0),
            zero_stride, part.stride(0) if split else 0, **common,
        )  # fmt: skip
    else:
        sizes = (m, n, k, k_per_split, group, x.stride(0), qweight.stride(0), scales.stride(0),
                 zero_stride, out.stride(0), part.stride(1) if split else 0,
                 part.stride(0) if split else 0)  # fmt: skip
        kernel = _w4a16_tc_kernel if config.kernel == "tc" else _w4a16_kernel
        precision, upcast = dot_mode(x.dtype, kernel)
        if config.kernel == "tc":
            tile_groups = max(1, config.block_k // group)
            specific = dict(TILE_GROUPS=tile_groups, SWAP=config.swap,
                            SCALE_AFTER=config.scale_after and tile_groups == 1)  # fmt: skip
        else:
            specific = dict(PLANES=config.planes and config.block_k >= 128)
        kernel[(tiles, splits)](
            x, *weight, *sizes, BLOCK_M=config.block_m, GROUP_M=config.group_m,
            PRECISION=precision, UPCAST=upcast, **specific, **common,
        )  # fmt: skip
    if split and not fixup:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](
            part,
            bias if bias is not None else part,
            out,
            n,
            splits,
            part.stride(0),
            part.stride(1),
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
