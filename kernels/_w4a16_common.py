"""What the W4A16 dot kernels (``w4a16._w4a16_kernel``, ``_w4a16_tc._w4a16_tc_kernel``)
share (the GEMV, ``w4a16._w4a16_gemv_kernel``, too where it reads the same things): the
order in which programs walk the output tiles, a K tile's packed words, a group's scales
and zero points, and the end of a program, which writes its tile or its split's partial
sums (see ``kernels/w4a16.py``'s DESIGN for the split-K scheme and the fixup).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles share each column tile (its weights) while it is
    # in L2, instead of every row tile sweeping all of W.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _load_words(qw_ptr, k0, k_end, offs_n, mask_n, stride_qk, BLOCK_W: tl.constexpr):
    # -> the word rows of the K tile at k0 [BW], their mask, the packed words [BW, BN]
    word_rows = k0 // 8 + tl.arange(0, BLOCK_W)
    mask_w = word_rows * 8 < k_end
    words = tl.load(
        qw_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
        mask=mask_w[:, None] & mask_n[None, :],
        other=0,
    )
    return word_rows, mask_w, words


@triton.jit
def _group_row(
    scales_ptr, zeros_ptr, group, offs_n, mask_n, stride_sg, stride_zg, HAS_ZEROS: tl.constexpr
):
    # -> scale, zero point of one group for the tile's columns: [BN] fp32 each
    scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0)
        zero = zero.to(tl.float32)
    else:
        zero = tl.full(offs_n.shape, 8.0, tl.float32)
    return scale.to(tl.float32), zero


@triton.jit
def _write_out(
    acc, rows, offs_n, mask, mask_n, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr
):
    # acc: [BM, BN] fp32, rows: int64 [BM, 1] row indices
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + rows * stride_om + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(
    acc,  # [BM, BN] fp32: this split's sum
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    tile,  # this program's output tile, the index of its counter
    out_ptr,
    part_ptr,  # [S, M, N] fp32 workspace, with SPLIT
    lock_ptr,  # [tiles] int32 arrival counters, zero between launches, with FIXUP
    bias_ptr,
    stride_om,
    stride_pm,
    stride_ps,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FIXUP: tl.constexpr,
):
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if SPLIT:
        parts = part_ptr + rows * stride_pm + offs_n[None, :]
        tl.store(parts + tl.program_id(1).to(tl.int64) * stride_ps, acc, mask=mask)
        if FIXUP:
            num_splits = tl.num_programs(1)
            # Every thread's partials are stored before the (release) arrival; the last
            # split's acquire makes the other splits' partials visible to its loads.
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                total = tl.zeros_like(acc)
                for s in range(num_splits):  # in order: the same sum whoever is last
                    src = parts + s * stride_ps  # [S, M, N] stays far below 2**31 elements
                    total += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")
                _write_out(total, rows, offs_n, mask, mask_n, bias_ptr, out_ptr, stride_om,
                           HAS_BIAS)  # fmt: skip
                tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        _write_out(acc, rows, offs_n, mask, mask_n, bias_ptr, out_ptr, stride_om, HAS_BIAS)
