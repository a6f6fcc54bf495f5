"""The tensor-core W4A16 kernel for 16-256 rows: each K tile of W is read once as packed
words, unpacked and dequantized in registers, and multiplied by one ``tl.dot`` of depth
``BLOCK_K`` (``kernels/w4a16.py``'s DESIGN says when it runs and why).

Unpacking. A ``[BLOCK_K / 8, BLOCK_N]`` tile of words is transposed (a layout change, no
data moves) and each of its eight nibble planes dequantized in float32 as a
``[BLOCK_N, BLOCK_K / 8]`` tensor, plane j holding the rows ``8i + j``. Three levels of
``tl.join`` put the planes back in row order, and the tile is cast to the activation
dtype once, after the reshape::

    p_j[n, i]                 = W[8i + j, n]               8 planes [BN, BW]
    join(join(p0, p4), join(p2, p6))[n, i, a, b]  = p_{4a+2b}   even nibbles
    join(join(p1, p5), join(p3, p7))[n, i, a, b]  = p_{4a+2b+1} odd nibbles
    join(even, odd)[n, i, a, b, c]                = p_{4a+2b+c}
    reshape -> [BN, BK]: column 8i + 4a + 2b + c = row 8i + j of W      (W^T tile)

A join adds its new dimension inside each thread, so a thread ends up holding its words'
eight rows in registers, next to each other: the reshape moves nothing, and the tile
reaches the dot in one layout conversion (the one any register tile needs). Broadcasting
``words[:, None, :] >> shifts`` instead spreads a word's nibbles over eight threads and
costs a shuffle through shared memory of the whole tile (compiled for sm_90 and read:
132 shared-memory stores per thread and tile instead of 20).

Dequantizing. When one group covers the whole tile (``PER_COLUMN``: ``BLOCK_K`` divides
the group size), a plane costs one AND, one subtraction and one multiplication per
weight, by the exponent trick of the GEMV: the exponent bits of 2**23 are ORed into each
word once (``low``: nibbles 0-4, ``high``: nibbles 5-7 shifted down by 20), and::

    bits(low & (0x4B000000 | 0xF << pos)) = 2**23 + code * 2**pos            exact
    (that - (2**23 + zero * 2**pos)) * (scale * 2**-pos) = (code - zero) * scale

with the two per-column constants computed once per plane. With smaller groups each
word row has its own scale and zero (``[BN, BW]``), and a plane shifts its nibble down
first (one more instruction per weight).

``SCALE_AFTER`` (one group per tile) leaves the scale out of the weights: one FMA,
``(2**23 + code * 2**pos) * 2**-pos - (2**(23 - pos) + zero)``, gives ``code - zero``
exactly (a small integer, exact in fp16 and bf16 too), and the tile's dot result is
multiplied by the column's scale in float32 instead, once per output element and tile
rather than once per weight: fewer instructions when the tile has fewer rows than K
(compiled for sm_90: 574 instead of 825 per 128 weights at 16 rows with ``SWAP``), and no
rounding of the scaled weight. The dot then starts from zero in every iteration and its
result waits to be scaled, where without it the tensor cores accumulate in place.

Operands. ``SWAP`` computes ``out^T = W^T @ x^T``: the weight tile is the dot's first
operand, which wgmma (sm_90) takes from registers, and the rows are its N side, which may
be as small as 8 (16 here); without it the weight tile goes through shared memory as the
second operand, and fewer than 64 rows run on the older mma.sync path. Which is faster
for a row count is the sweep's to say (``benchmarks/w4a16.py --sweep``).

A tile's scale and zero rows are loaded one iteration ahead by hand: one 2-byte scale per
thread is too narrow for the pipeliner's asynchronous copies, and an unpipelined load in
the loop would wait a full memory latency per K tile. With act-order (``perm``) the
activation columns are gathered, 2 bytes at a time, and that load is not pipelined
either: not measured yet (``benchmarks/w4a16.py --act-order``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tessera.kernels._paged_common import _dot
from tessera.kernels._w4a16_common import _finish, _group_row, _load_words, _tile_coords

# 2**23: bits(0x4B000000 | q) is 2**23 + q for 0 <= q < 2**23 (a constexpr: jit code reads
# no other globals)
BIAS = tl.constexpr(8388608.0)


@triton.jit
def _plane_or(src, pos: tl.constexpr, zero, scale, SCALE_AFTER: tl.constexpr):
    # src: words with 0x4B000000 ORed in, this nibble at bits pos..pos+3 (pos <= 16);
    # zero, scale: [BN, 1] fp32 (the zero point, not yet biased) -> fp32 weights
    biased = (src & (0x4B000000 | (0xF << pos))).to(tl.float32, bitcast=True)
    if SCALE_AFTER:  # code - zero, exact, in one FMA: the scale multiplies the dot's result
        w = biased * (1.0 / (1 << pos)) - (zero + BIAS / (1 << pos))
    else:
        offset = zero * (1 << pos) + BIAS  # 2**23 + zero * 2**pos, exact
        w = (biased - offset) * (scale * (1.0 / (1 << pos)))
    return w


@triton.jit
def _plane_shift(words, j: tl.constexpr, zero, scale):
    # zero, scale: [BN, BW] fp32, one per word row (groups smaller than the tile)
    biased = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
    return (biased - (zero + BIAS)) * scale


@triton.jit
def _unpack(
    words,  # [BW, BN] int32
    zero,  # [BN, 1] or [BN, BW] fp32 zero points
    scale,  # the same shape, fp32
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_COLUMN: tl.constexpr,
    SCALE_AFTER: tl.constexpr,  # with PER_COLUMN: code - zero, the scale left out
):
    # -> [BN, BK] in DTYPE: the dequantized W^T tile (see the module docstring)
    wt = tl.trans(words)  # [BN, BW]
    if PER_COLUMN:
        low = (wt & 0xFFFFF) | 0x4B000000
        high = ((wt >> 20) & 0xFFF) | 0x4B000000
        p0 = _plane_or(low, 0, zero, scale, SCALE_AFTER)
        p1 = _plane_or(low, 4, zero, scale, SCALE_AFTER)
        p2 = _plane_or(low, 8, zero, scale, SCALE_AFTER)
        p3 = _plane_or(low, 12, zero, scale, SCALE_AFTER)
        p4 = _plane_or(low, 16, zero, scale, SCALE_AFTER)
        p5 = _plane_or(high, 0, zero, scale, SCALE_AFTER)
        p6 = _plane_or(high, 4, zero, scale, SCALE_AFTER)
        p7 = _plane_or(high, 8, zero, scale, SCALE_AFTER)
    else:
        p0 = _plane_shift(wt, 0, zero, scale)
        p1 = _plane_shift(wt, 1, zero, scale)
        p2 = _plane_shift(wt, 2, zero, scale)
        p3 = _plane_shift(wt, 3, zero, scale)
        p4 = _plane_shift(wt, 4, zero, scale)
        p5 = _plane_shift(wt, 5, zero, scale)
        p6 = _plane_shift(wt, 6, zero, scale)
        p7 = _plane_shift(wt, 7, zero, scale)
    even = tl.join(tl.join(p0, p4), tl.join(p2, p6))  # [BN, BW, 2, 2]: nibble 4a + 2b
    odd = tl.join(tl.join(p1, p5), tl.join(p3, p7))  # nibble 4a + 2b + 1
    # Cast after the reshape: with the cast inside the planes, the reshape fed the shared
    # memory buffer of the non-swapped dot directly, and Triton 3.6 (sm_90) then moved the
    # reshape into shared memory with an illegal layout (a compile error at N % 16 != 0,
    # or 64x32x32 tiles).
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K)).to(DTYPE)


@triton.jit
def _w4a16_tc_kernel(
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
    group_size,  # a multiple of BLOCK_K, or of 16 dividing BLOCK_K (TILE_GROUPS > 1)
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TILE_GROUPS: tl.constexpr,  # groups in one K tile: 1 when BLOCK_K divides the group
    SWAP: tl.constexpr,  # out^T = W^T @ x^T: the weight tile as the dot's first operand
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_AFTER: tl.constexpr,  # (TILE_GROUPS 1) scales multiply each tile's dot result
):
    BLOCK_W: tl.constexpr = BLOCK_K // 8  # words per column in a tile
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_coords(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64) * stride_xm
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TILE_GROUPS == 1:
        scale, zero = _group_row(scales_ptr, zeros_ptr, k_start // group_size, offs_n, mask_n,
                                 stride_sg, stride_zg, HAS_ZEROS)  # fmt: skip
        scale, zero = scale[:, None], zero[:, None]  # [BN, 1]
    for k0 in range(k_start, k_end, BLOCK_K):
        word_rows, mask_w, words = _load_words(qw_ptr, k0, k_end, offs_n, mask_n, stride_qk,
                                               BLOCK_W)  # fmt: skip
        if TILE_GROUPS == 1:
            # The next tile's group, read now and used a whole iteration later (K - 1 is in
            # the last group: no read past the table after the last tile).
            next_group = tl.minimum(k0 + BLOCK_K, K - 1) // group_size
            next_scale, next_zero = _group_row(scales_ptr, zeros_ptr, next_group, offs_n, mask_n,
                                               stride_sg, stride_zg, HAS_ZEROS)  # fmt: skip
            next_scale, next_zero = next_scale[:, None], next_zero[:, None]
            w = _unpack(words, zero, scale, DTYPE, BLOCK_N, BLOCK_K, True, SCALE_AFTER)
            tile_scale = scale
            scale, zero = next_scale, next_zero
        else:
            groups = (word_rows * 8 // group_size)[None, :]  # [1, BW]: each word row's group
            mask_g = mask_n[:, None] & mask_w[None, :]
            row_scale = tl.load(scales_ptr + groups * stride_sg + offs_n[:, None], mask=mask_g,
                                other=0.0).to(tl.float32)  # fmt: skip
            if HAS_ZEROS:
                row_zero = tl.load(zeros_ptr + groups * stride_zg + offs_n[:, None], mask=mask_g,
                                   other=0).to(tl.float32)  # fmt: skip
            else:
                row_zero = tl.full((BLOCK_N, BLOCK_W), 8.0, tl.float32)
            w = _unpack(words, row_zero, row_scale, DTYPE, BLOCK_N, BLOCK_K, False, False)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        # Columns past k_end read as 0, so the weight rows there (code 0, not zero) add 0.
        if SWAP:
            a = tl.load(x_ptr + rows[None, :] + cols[:, None],
                        mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # fmt: skip
            part = _dot(w, a, PRECISION, UPCAST)  # [BN, BK] @ [BK, BM]
            if SCALE_AFTER:
                part = part * tile_scale  # [BN, 1]
        else:
            a = tl.load(x_ptr + rows[:, None] + cols[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            part = _dot(a, tl.trans(w), PRECISION, UPCAST)  # [BM, BK] @ [BK, BN]
            if SCALE_AFTER:
                part = part * tl.trans(tile_scale)  # [1, BN]
        acc += part  # without SCALE_AFTER, the dot accumulates into acc itself
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, offs_m, offs_n, mask_m, mask_n, pid, out_ptr, part_ptr, lock_ptr, bias_ptr,
            stride_om, stride_pm, stride_ps, HAS_BIAS, SPLIT, FIXUP)  # fmt: skip
