"""Paged prefill attention: causal attention of variable-length query runs over their
paged context, and its host launcher.

The pool layout, GQA row packing and dtype rules are ``kernels._paged_common``'s; here
a program's rows are (token, head) pairs: row r = token r // G, head r % G, so
``BLOCK_M`` rows hold ``BLOCK_M // G`` tokens.

Grid ``(H_kv, cdiv(max_query_len, BLOCK_M // G), S + 1)``: query ``i`` of sequence ``s``
sits at position ``ctx_s - q_len_s + i`` and sees keys ``0..pos``. A query tile first
runs over key tiles that lie wholly below its smallest position (no causal mask), then
over the diagonal tiles with it. Tiles are visited longest-first. The extra sequence
index ``S`` zeroes rows past ``query_start_loc[S]`` (padding tokens), so every row of
``out`` is written.

DESIGN. Each key tile is one FlashAttention-2 step: s = q @ k^T on the tensor cores,
an online softmax in fp32 with base-2 exponentials (the scale is folded into the one
multiply-add s * scale * log2(e) - m, from the host), then acc = acc * alpha + p @ v,
which Triton turns into a wgmma accumulating into acc. V feeds the wgmma as stored
([BLOCK_N, D], read transposed from shared memory at full rate for 16-bit types), and
16-bit dots have no input-precision choice. ``PrefillConfig`` selects, besides tiles,
warps and pipeline stages, these variants (all off is the kernel first tuned on an
H100; ``benchmarks/tune_attention.py --only prefill`` measures them side by side):

- ``mask_full=False``: whole tiles below the diagonal load K/V with no row mask.
- ``page_reads``: one block-table read per page, not per key row, where page size and
  BLOCK_N divide one another; a tile inside one page reads one entry and its rows are
  contiguous.
- ``ahead``: the next tile's table entries are read while this tile is computed, and
  its row offsets carried into the next iteration. Compiled for sm_90, a K/V load
  whose address comes from a table read in the same iteration is an indirect load to
  Triton's software pipeliner: the table read takes a stage (K/V are prefetched one
  tile ahead at 3 and 4 stages), and each iteration starts by waiting for every copy
  in flight, the next table read included, so the gather's latency is paid per tile.
  Carried offsets make the loads direct: prefetched num_stages - 1 tiles ahead, with
  the next ones left in flight (TTGIR: async_wait num=2 instead of 0 at 3 stages).
- ``overlap`` (whole tiles): software-pipelined by one tile, so P @ V of tile j is
  issued before the softmax of tile j + 1 and the tensor cores run it meanwhile (the
  other FA3 direction, q @ k^T during the softmax, is out of reach: Triton waits for a
  dot as soon as non-dot code reads its result). Two details keep Triton and ptxas on
  board: V's table rows are read afresh, since a value carried two iterations makes
  the pipeliner give up on the loop, and the first tile is masked instead of guarded
  by an ``if``, since acc flowing through one made ptxas serialise every wgmma of the
  kernel (C7515).
- ``lazy_rescale``: a row's running max moves only when a tile raises it by more
  than 2**8, so most tiles rescale nothing and one tile-wide test skips acc * alpha.

Out of reach in Triton 3.6: Hopper's bulk tensor copies (TMA) through a paged gather
(a tile of 16-token pages is several boxes, not one wgmma operand), and warp
specialization (``tl.range(warp_specialize=True)`` leaves this kernel unpartitioned on
sm_90), so there is no producer warp and no ping-pong between warpgroups; Gluon
(``triton.experimental.gluon``) could express both.

Measured on an H100 (benchmarks/bench_kernels.py, Llama-3-8B attention shapes, bf16):
prefill of one 4k-token prompt runs at 0.53 of the bf16 matmul rate (417 TFLOP/s) with
the first kernel (all variants off).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tessera.kernels import _paged_common as paged
from tessera.kernels._attention_checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_block,
    check_devices,
    check_heads,
    check_kv_caches,
    check_out,
    check_scale,
    check_tables,
    check_tensor,
)
from tessera.kernels._paged_common import _dot, _index, _kv_mask

LAZY_SLACK = tl.constexpr(8.0)  # log2 units: a stale running max may trail the true one by 2**8


@triton.jit
def _kv_rows(
    table,
    n0,
    n_end,
    head_off,
    stride_c_n,
    stride_c_b,
    stride_bt_w,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_READS: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Pool offsets [BLOCK_N] of the K/V rows of key positions n0..n0+BLOCK_N-1.

    Positions at or past ``n_end`` read no table entry (they may lie past the
    sequence's blocks) and get offset ``head_off``; their loads are masked or unused.
    """
    j = tl.arange(0, BLOCK_N)
    tok = n0 + j
    if PAGE_READS and BLOCK_SIZE % BLOCK_N == 0:
        # n0 is a multiple of BLOCK_N, so the whole tile lies in one page: one read.
        block = tl.load(table + (n0 // BLOCK_SIZE) * stride_bt_w, mask=n0 < n_end, other=0)
        rows = _index(block, INDEX_64) * stride_c_n + (tok % BLOCK_SIZE) * stride_c_b + head_off
    elif PAGE_READS and BLOCK_N % BLOCK_SIZE == 0:
        # BLOCK_N // BLOCK_SIZE whole pages: one scalar read per page, not per row.
        page0 = n0 // BLOCK_SIZE
        base = _index(tl.zeros([BLOCK_N], tl.int32), INDEX_64)
        for i in tl.static_range(BLOCK_N // BLOCK_SIZE):
            live = (page0 + i) * BLOCK_SIZE < n_end
            block = tl.load(table + (page0 + i) * stride_bt_w, mask=live, other=0)
            base = tl.where(j // BLOCK_SIZE == i, _index(block, INDEX_64) * stride_c_n, base)
        rows = base + (j % BLOCK_SIZE) * stride_c_b + head_off
    else:  # a read per row (also for page sizes that do not divide or fill a tile)
        block = tl.load(table + (tok // BLOCK_SIZE) * stride_bt_w, mask=tok < n_end, other=0)
        rows = _index(block, INDEX_64) * stride_c_n + (tok % BLOCK_SIZE) * stride_c_b + head_off
    return rows


@triton.jit
def _load_kv(
    ptr, rows, tok, n_end, d, stride_c_d, dtype, MASKED: tl.constexpr, HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A [BLOCK_N, BLOCK_D] tile of K or V, cast to ``dtype``; MASKED zeroes rows at or
    past ``n_end`` (off for tiles known to be whole, so no predicate is computed)."""
    off = rows[:, None] + d[None, :] * stride_c_d
    if MASKED:
        x = tl.load(ptr + off, mask=_kv_mask(tok < n_end, d, HEAD_SIZE, BLOCK_D), other=0.0)
    elif HEAD_SIZE == BLOCK_D:
        x = tl.load(ptr + off)
    else:
        x = tl.load(ptr + off, mask=(d < HEAD_SIZE)[None, :], other=0.0)
    return x.to(dtype)


@triton.jit
def _softmax_step(s, tok, q_pos, m_i, l_i, qk_scale, CAUSAL: tl.constexpr, LAZY: tl.constexpr):
    """Fold one tile's scores s [BLOCK_M, BLOCK_N] into the running max ``m_i`` and sum
    ``l_i`` (base 2, scale folded into one multiply-add): (p, alpha, m_i, l_i), where
    the accumulator must be scaled by ``alpha`` before ``p @ v`` is added to it.

    LAZY keeps a row's max unless the tile raises it by more than LAZY_SLACK, so on
    most tiles alpha is 1 for every row and the rescale can be skipped; p <= 2**8 then,
    harmless in fp32 sums and in bf16/fp16 (same exponent range as the true max gives).
    """
    if CAUSAL:
        s = tl.where(tok[None, :] <= q_pos[:, None], s, float("-inf"))
    m_tile = tl.max(s, 1) * qk_scale
    if LAZY:
        m_new = tl.where(m_tile > m_i + LAZY_SLACK, m_tile, m_i)
    else:
        m_new = tl.maximum(m_i, m_tile)
    m_sub = m_new
    if CAUSAL:
        # A row with no visible key so far keeps m = -inf; subtract 0 instead so it
        # yields zeros, not NaN (-inf - -inf), and a later key still sets its max.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _rescale(acc, alpha, LAZY: tl.constexpr):
    if LAZY:
        if tl.min(alpha, 0) < 1.0:  # one tile-wide test instead of BLOCK_M x BLOCK_D products
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    return acc


@triton.jit
def _prefill_tiles(
    q,
    q_pos,  # [BLOCK_M] absolute position of each row's token
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table,
    head_off,
    d,
    n_start,
    n_end,
    qk_scale,
    stride_c_n,
    stride_c_b,
    stride_c_d,
    stride_bt_w,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    INDEX_64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PAGE_READS: tl.constexpr,
    AHEAD: tl.constexpr,
    LAZY: tl.constexpr,
):
    """Online softmax over key tiles ``[n_start, n_end)``; CAUSAL masks key > q_pos.

    AHEAD reads the next tile's block-table entries while this tile is computed, so
    K/V addresses never wait on a table read (and the software pipeliner sees direct
    loads it can prefetch ``num_stages - 1`` tiles ahead, not one).
    """
    if AHEAD:
        rows = _kv_rows(table, n_start, n_end, head_off, stride_c_n, stride_c_b, stride_bt_w,
                        BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
    for n0 in range(n_start, n_end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        if AHEAD:
            rows_next = _kv_rows(table, n0 + BLOCK_N, n_end, head_off, stride_c_n, stride_c_b,
                                 stride_bt_w, BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
        else:
            rows = _kv_rows(table, n0, n_end, head_off, stride_c_n, stride_c_b, stride_bt_w,
                            BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
        k = _load_kv(k_cache_ptr, rows, tok, n_end, d, stride_c_d, q.dtype, MASKED, HEAD_SIZE,
                     BLOCK_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
        p, alpha, m_i, l_i = _softmax_step(s, tok, q_pos, m_i, l_i, qk_scale, CAUSAL, LAZY)
        v = _load_kv(v_cache_ptr, rows, tok, n_end, d, stride_c_d, q.dtype, MASKED, HEAD_SIZE,
                     BLOCK_D)
        acc = _rescale(acc, alpha, LAZY) + _dot(p.to(q.dtype), v, PRECISION, UPCAST)
        if AHEAD:
            rows = rows_next
    return m_i, l_i, acc


@triton.jit
def _prefill_tiles_overlapped(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table,
    head_off,
    d,
    n_start,
    n_end,
    qk_scale,
    stride_c_n,
    stride_c_b,
    stride_c_d,
    stride_bt_w,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INDEX_64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PAGE_READS: tl.constexpr,
    AHEAD: tl.constexpr,
    LAZY: tl.constexpr,
):
    """Whole key tiles ``[n_start, n_end)`` (a multiple of BLOCK_N long, no causal mask),
    software-pipelined by one tile:

        iteration j:  s_j = q @ k_j^T      (waits for every earlier product)
                      acc = acc * alpha_{j-1} + p_{j-1} @ v_{j-1}   (issued, not awaited)
                      p_j, alpha_j = softmax(s_j)   <- runs while p_{j-1} @ v_{j-1} does

    so the tensor cores work on P @ V while the exponentials of the next tile are
    computed (Hopper's dots are asynchronous; a dot whose result is next read after
    the following dot's wait is left in flight by Triton's pipeliner).
    """
    # The first tile's scores. Its loads and keys are masked so that an empty range
    # (n_end == n_start) adds nothing; no `if` around it: ptxas serialises every wgmma
    # of the kernel when acc passes through one here (C7515).
    tok = n_start + tl.arange(0, BLOCK_N)
    rows_v = _kv_rows(table, n_start, n_end, head_off, stride_c_n, stride_c_b, stride_bt_w,
                      BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
    k = _load_kv(k_cache_ptr, rows_v, tok, n_end, d, stride_c_d, q.dtype, True, HEAD_SIZE,
                 BLOCK_D)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST)
    last = tl.full([BLOCK_M], n_end - 1, tl.int32)
    p, alpha, m_i, l_i = _softmax_step(s, tok, last, m_i, l_i, qk_scale, True, LAZY)
    if AHEAD:
        rows = _kv_rows(table, n_start + BLOCK_N, n_end, head_off, stride_c_n, stride_c_b,
                        stride_bt_w, BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
    for n0 in range(n_start + BLOCK_N, n_end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        if AHEAD:
            rows_next = _kv_rows(table, n0 + BLOCK_N, n_end, head_off, stride_c_n, stride_c_b,
                                 stride_bt_w, BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
        else:
            rows = _kv_rows(table, n0, n_end, head_off, stride_c_n, stride_c_b, stride_bt_w,
                            BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
        k = _load_kv(k_cache_ptr, rows, tok, n_end, d, stride_c_d, q.dtype, False, HEAD_SIZE,
                     BLOCK_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)
        v = _load_kv(v_cache_ptr, rows_v, tok, n_end, d, stride_c_d, q.dtype, False, HEAD_SIZE,
                     BLOCK_D)
        acc = _rescale(acc, alpha, LAZY) + _dot(p.to(q.dtype), v, PRECISION, UPCAST)
        p, alpha, m_i, l_i = _softmax_step(s, tok, tok, m_i, l_i, qk_scale, False, LAZY)
        if AHEAD:
            # Read afresh, not carried over from `rows`: a table value carried two
            # iterations makes Triton's pipeliner give up on the loop.
            rows_v = _kv_rows(table, n0, n_end, head_off, stride_c_n, stride_c_b, stride_bt_w,
                              BLOCK_SIZE, BLOCK_N, PAGE_READS, INDEX_64)
            rows = rows_next
        else:
            rows_v = rows
    tok = tl.maximum(n_end - BLOCK_N, n_start) + tl.arange(0, BLOCK_N)  # the last tile
    v = _load_kv(v_cache_ptr, rows_v, tok, n_end, d, stride_c_d, q.dtype, True, HEAD_SIZE,
                 BLOCK_D)
    acc = _rescale(acc, alpha, LAZY) + _dot(p.to(q.dtype), v, PRECISION, UPCAST)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_tokens", "num_seqs", "stride_bt_s"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    out_ptr,
    qk_scale,
    num_tokens,
    num_seqs,
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_c_n,
    stride_c_b,
    stride_c_h,
    stride_c_d,
    stride_bt_s,
    stride_bt_w,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INDEX_64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    MASK_FULL: tl.constexpr,
    PAGE_READS: tl.constexpr,
    AHEAD: tl.constexpr,
    OVERLAP: tl.constexpr,
    LAZY: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile
    kv_head = tl.program_id(0)
    num_tiles = tl.num_programs(1)
    tile = num_tiles - 1 - tl.program_id(1)  # the longest (last) tiles start first
    seq = tl.program_id(2)

    r = tl.arange(0, BLOCK_M)
    r_tok = r // GROUP
    heads = kv_head * GROUP + r % GROUP
    live_row = r < TOKENS * GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_SIZE

    if seq == num_seqs:
        # Padding tokens after the last sequence: write zeros so no row is left unset.
        tail = tl.load(query_start_loc_ptr + num_seqs).to(tl.int32)
        zeros = tl.zeros([BLOCK_M, BLOCK_D], out_ptr.dtype.element_ty)
        for t0 in range(tail + tile * TOKENS, num_tokens, num_tiles * TOKENS):
            t = t0 + r_tok
            dst = out_ptr + t.to(tl.int64)[:, None] * stride_o_t + heads[:, None] * stride_o_h
            mask = (live_row & (t < num_tokens))[:, None] & d_mask[None, :]
            tl.store(dst + d[None, :] * stride_o_d, zeros, mask=mask)
    else:
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
        t0 = tile * TOKENS
        if t0 < q_len:
            ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
            first = ctx - q_len  # position of the sequence's query 0
            last = tl.minimum(t0 + TOKENS, q_len) - 1  # last query index in this tile
            q_idx = t0 + r_tok
            row_mask = live_row & (q_idx <= last)
            q_pos = first + tl.minimum(q_idx, last)  # dead rows borrow a live position
            rows = (q_start + q_idx).to(tl.int64)
            q_mask = row_mask[:, None] & d_mask[None, :]
            q = tl.load(
                q_ptr + rows[:, None] * stride_q_t + heads[:, None] * stride_q_h
                + d[None, :] * stride_q_d,
                mask=q_mask,
                other=0.0,
            )  # [BLOCK_M, BLOCK_D]

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            table = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
            head_off = _index(kv_head, INDEX_64) * stride_c_h
            # Keys 0..first+t0 are visible to every row: whole tiles of them need no mask.
            n_full = (tl.maximum(first + t0 + 1, 0) // BLOCK_N) * BLOCK_N
            if OVERLAP:
                m_i, l_i, acc = _prefill_tiles_overlapped(
                    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_off, d, 0, n_full,
                    qk_scale, stride_c_n, stride_c_b, stride_c_d, stride_bt_w, HEAD_SIZE,
                    BLOCK_SIZE, BLOCK_M, BLOCK_D, BLOCK_N, INDEX_64, PRECISION, UPCAST, PAGE_READS,
                    AHEAD, LAZY,
                )
            else:
                m_i, l_i, acc = _prefill_tiles(
                    q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_off, d, 0,
                    n_full, qk_scale, stride_c_n, stride_c_b, stride_c_d, stride_bt_w, HEAD_SIZE,
                    BLOCK_SIZE, BLOCK_D, BLOCK_N, False, MASK_FULL, INDEX_64, PRECISION, UPCAST,
                    PAGE_READS, AHEAD, LAZY,
                )
            m_i, l_i, acc = _prefill_tiles(
                q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_off, d, n_full,
                first + last + 1, qk_scale, stride_c_n, stride_c_b, stride_c_d, stride_bt_w,
                HEAD_SIZE, BLOCK_SIZE, BLOCK_D, BLOCK_N, True, True, INDEX_64, PRECISION, UPCAST,
                PAGE_READS, AHEAD, LAZY,
            )
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            dst = out_ptr + rows[:, None] * stride_o_t + heads[:, None] * stride_o_h
            tl.store(dst + d[None, :] * stride_o_d, o.to(out_ptr.dtype.element_ty), mask=q_mask)


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillConfig:
    """Tiles and code variant of one prefill launch.

    The flags select the variants of DESIGN (module docstring); all off is the kernel
    as first tuned on an H100, kept so a sweep can measure old against new.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    mask_full: bool = True  # mask the loads of whole tiles too (the first kernel did)
    page_reads: bool = False  # one table read per page, not per key row (see DESIGN)
    ahead: bool = False  # read the next tile's table entries one tile early
    overlap: bool = False  # P @ V of tile j in flight during the softmax of tile j + 1
    lazy_rescale: bool = False  # rescale acc only when a row's max grows by > 2**8

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            check_block(name, getattr(self, name), 16)
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps {self.num_warps} / num_stages {self.num_stages}")

    def label(self) -> str:
        """A short name for tables: ``128x64 w8 s3 +page+ahead``."""
        flags = [name for name, on in (
            ("unmasked", not self.mask_full), ("page", self.page_reads), ("ahead", self.ahead),
            ("overlap", self.overlap), ("lazy", self.lazy_rescale),
        ) if on]
        tiles = f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
        return " +".join([tiles, *flags])


# 16-bit queries, head size 128: (waves, config) rows, where waves = tiles_of_128 /
# num_sms and a launch takes the last row it reaches. Written by
# `benchmarks/tune_attention.py --only prefill`, which prints rows to paste here.
# Measured on an H100 (bf16, 32 query / 8 KV heads, one causal prompt on a shuffled paged
# pool; benchmarks/tune_attention.py --only prefill, 2026-12-07, results/
# tune_prefill_h100_dec07.json): with the table read a tile ahead, per page, and whole
# tiles unmasked, 8 warps win at every length: 306 TFLOP/s at 1k tokens (1.9 waves;
# the first kernel's best 285), 439 at 4k (412), 498 at 16k (447).
D128_TUNED: tuple[tuple[float, PrefillConfig], ...] = (
    (0.0, PrefillConfig(128, 64, 8, 3, mask_full=False, page_reads=True, ahead=True)),
    (3.9, PrefillConfig(128, 128, 8, 3, mask_full=False, page_reads=True, ahead=True)),
)


def _prefill_config(
    head_size: int, group: int, q_dtype: torch.dtype, tiles_of_128: int, num_sms: int
) -> PrefillConfig:
    """The prefill kernel's config for a launch.

    ``tiles_of_128`` is the program count that 128-row tiles would give (256 at 1k
    tokens of one prompt with 8 KV heads, 1024 at 4k): 16-bit D=128 picks from
    D128_TUNED by it. D=64 prefers 64x64, D=256 128x64 with 8 warps (H100).
    """
    block_d = max(16, triton.next_power_of_2(head_size))
    if q_dtype == torch.float32:  # not a serving dtype: sized to fit, not tuned
        config = PrefillConfig(32 if block_d >= 256 else 64, 32, 4, 2)
    elif block_d >= 256:
        config = PrefillConfig(128, 64, 8, 3)
    elif block_d >= 128:
        waves = tiles_of_128 / num_sms
        config = next(c for w, c in reversed(D128_TUNED) if waves >= w)
    else:
        config = PrefillConfig(64, 64, 4, 2)
    block_m = max(config.block_m, triton.next_power_of_2(group))
    return dataclasses.replace(config, block_m=block_m)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]: the step's queries, sequence after sequence
    k_cache: torch.Tensor,  # [N, block_size, H_kv, D], this step's K/V already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start_loc: torch.Tensor,  # [S+1] int32: sequence s owns q[qsl[s]:qsl[s+1]]
    context_lens: torch.Tensor,  # [S] int32: cached + this step's tokens
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype
    block_m: int | None = None,
    block_n: int | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of variable-length query runs over their paged context.

    ``max_query_len`` must be at least the longest run (rows past it stay unwritten);
    rows after ``query_start_loc[S]`` are zeroed. ``config`` replaces the tuned
    default (``_prefill_config``); ``block_m`` / ``block_n`` override its tiles.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    _, block_size, num_kv_heads, head_size = check_kv_caches(k_cache, v_cache)
    num_tokens, num_heads = q.shape[0], q.shape[1]
    check_heads(q, num_kv_heads, head_size)
    num_seqs = context_lens.shape[0] if isinstance(context_lens, torch.Tensor) else 0
    check_tables(block_tables, context_lens, num_seqs, "sequence")
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries for {num_seqs} "
            f"sequences (need S + 1)"
        )
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a non-negative int, got {max_query_len!r}")
    if max_query_len > num_tokens:
        raise ValueError(f"max_query_len {max_query_len} exceeds the {num_tokens} query rows")
    scale = check_scale(scale)
    out = check_out(out, q)
    check_devices(_prefill_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                  block_tables=block_tables, query_start_loc=query_start_loc,
                  context_lens=context_lens, out=out)
    group = num_heads // num_kv_heads
    if config is None:
        tiles_of_128 = num_kv_heads * num_seqs * triton.cdiv(max_query_len, max(1, 128 // group))
        config = _prefill_config(head_size, group, q.dtype, tiles_of_128, paged.num_sms(q.device))
    elif not isinstance(config, PrefillConfig):
        raise ValueError(f"config must be a PrefillConfig, got {type(config).__name__}")
    block_m = check_block("block_m", block_m, config.block_m)
    block_n = check_block("block_n", block_n, config.block_n)
    if block_m < group:
        raise ValueError(f"block_m {block_m} must hold one token's {group} query heads")
    if num_tokens == 0:
        return out

    tokens_per_tile = block_m // group
    num_tiles = max(1, triton.cdiv(max_query_len, tokens_per_tile))
    precision, upcast = paged.dot_mode(q.dtype, _prefill_kernel)
    _prefill_kernel[(num_kv_heads, num_tiles, num_seqs + 1)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        scale * paged.LOG2E,
        num_tokens,
        num_seqs,
        *q.stride(),
        *k_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_size)),
        BLOCK_N=block_n,
        INDEX_64=paged.needs_int64(k_cache),
        PRECISION=precision,
        UPCAST=upcast,
        MASK_FULL=config.mask_full,
        PAGE_READS=config.page_reads,
        AHEAD=config.ahead,
        OVERLAP=config.overlap,
        LAZY=config.lazy_rescale,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
