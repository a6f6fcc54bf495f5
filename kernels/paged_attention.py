"""Paged attention over the block-table KV pool: decode (split-KV) and variable-length prefill.

DESIGN. Keys and values of one layer live in ``k_cache``/``v_cache`` ``[N, B, H_kv, D]``;
token ``p`` of a sequence is row ``p % B`` of block ``block_table[p // B]``. Both
kernels gather a key tile of ``BLOCK_N`` tokens (several pool blocks) per step through
the block table, one ``int32`` table read per token, and keep an online softmax in
fp32 with base-2 exponentials (scores are scaled by ``scale * log2(e)`` once). Pool
offsets are computed in int32 unless the pool's shape and strides can reach 2**31
elements (``INDEX_64``): the 64-bit arithmetic took ~11% of prefill time on an H100.

GQA: a program serves every query head of one KV head, so each K/V tile is read once
for the whole group. The group's rows are packed into the M dimension of ``tl.dot``:

    decode   rows = the G = H / H_kv heads of one token, padded to >= 16 rows
    prefill  rows = (token, head) pairs: row r = token r // G, head r % G
             BLOCK_M rows = BLOCK_M // G tokens (dead rows masked when G does not divide)

Decode, grid ``(B, H_kv, num_splits)``: split ``s`` of sequence ``b`` covers tokens
``[s * L, (s + 1) * L)`` with ``L = cdiv(cdiv(ctx_b, num_splits), BLOCK_N) * BLOCK_N``,
computed on the device from ``context_lens`` so the grid depends on shapes only (CUDA
graphs). With one split the program writes ``out`` directly; otherwise each writes a
normalised partial output and its log-sum-exp to an fp32 workspace and a second kernel,
grid ``(B, H)``, merges them (empty splits carry ``lse = -inf`` and weigh nothing).
The default ``num_splits`` aims at about two programs per multiprocessor and at least
``_MIN_SPLIT_TILES`` key tiles per split, from ``B``, ``H_kv`` and the block table width.

Prefill, grid ``(H_kv, cdiv(max_query_len, BLOCK_M // G), S + 1)``: query ``i`` of
sequence ``s`` sits at position ``ctx_s - q_len_s + i`` and sees keys ``0..pos``. A
query tile first runs over key tiles that lie wholly below its smallest position
(no causal mask), then over the diagonal tiles with it. Tiles are visited
longest-first. The extra sequence index ``S`` zeroes rows past ``query_start_loc[S]``
(padding tokens), so every row of ``out`` is written.

Measured on an H100 (benchmarks/kernels.py, Llama-3-8B attention shapes, bf16): decode
reads K/V at 0.99 of the device-to-device copy rate at batch 64, 2k context; prefill of
one 4k-token prompt runs at 0.53 of the bf16 matmul rate (417 TFLOP/s).

Rows with no visible key (``context_lens == 0``) produce zeros, never NaN. Mixed dtypes
are allowed: K/V tiles are cast to the query dtype before the dot products, as the
torch backend does; fp32 queries use IEEE fp32 dots (no tf32).

Integers that change from step to step (token and sequence counts, block-table widths,
split counts) are marked ``do_not_specialize``: Triton would otherwise compile a
variant of the kernel for each of "equals 1", "a multiple of 16" and "other" of each of
them, and a serving engine would meet those compiles, seconds each, in the middle of
traffic (an 8B model at 4 requests/s showed a TTFT p99 of 5.8 s from them).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from tessera.kernels._attention_checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_devices,
    check_kv_caches,
    check_out,
    check_tensor,
    interpreted,
)

_LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) = exp2(x * log2(e))
_MAX_HEAD_SIZE = 256
_MAX_SPLITS = 128
_MIN_SPLIT_TILES = 4  # a split shorter than this many key tiles is mostly overhead


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter (triton 3.6) multiplies bf16 bit patterns as integers; UPCAST,
    # set only under TRITON_INTERPRET, does the same product in fp32 instead.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _index(x, INDEX_64: tl.constexpr):
    # Pool offsets in int32 when the pool allows: 64-bit address arithmetic on every
    # gathered K/V row took ~11% of prefill time at 4k tokens on an H100.
    if INDEX_64:
        y = x.to(tl.int64)
    else:
        y = x.to(tl.int32)
    return y


@triton.jit
def _kv_mask(t_mask, d, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    # Leave the head dimension unmasked when it fills the tile, so nothing can stop
    # the compiler from issuing full-width vector loads along it.
    if HEAD_SIZE == BLOCK_D:
        mask = t_mask[:, None]
    else:
        mask = t_mask[:, None] & (d[None, :] < HEAD_SIZE)
    return mask


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["num_splits", "stride_bt_b"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,  # [B, H, S, D] fp32, used when SPLIT
    part_lse_ptr,  # [B, H, S] fp32, used when SPLIT
    qk_scale,
    num_splits,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_c_n,
    stride_c_b,
    stride_c_h,
    stride_c_d,
    stride_bt_b,
    stride_bt_w,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    INDEX_64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + b).to(tl.int32)
    if SPLIT:
        split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, ctx)
    else:
        start = 0
        end = ctx

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_SIZE
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h + d[None, :] * stride_q_d,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    head_off = _index(kv_head, INDEX_64) * stride_c_h
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        t_mask = tok < end
        block = tl.load(table + (tok // BLOCK_SIZE) * stride_bt_w, mask=t_mask, other=0)
        row = _index(block, INDEX_64) * stride_c_n + (tok % BLOCK_SIZE) * stride_c_b + head_off
        kv_off = row[:, None] + d[None, :] * stride_c_d
        kv_mask = _kv_mask(t_mask, d, HEAD_SIZE, BLOCK_D)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)  # [BLOCK_G, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # The first tile holds a real key, so m_new is finite from here on.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # zero rows stay zero
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        bh = b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads  # row of [B * H]
        part = part_out_ptr + ((bh * num_splits + split) * HEAD_SIZE)[:, None] + d[None, :]
        tl.store(part, o, mask=o_mask)
        tl.store(part_lse_ptr + bh * num_splits + split, lse, mask=g_mask)
    else:
        dst = out_ptr + b.to(tl.int64) * stride_o_b + heads[:, None] * stride_o_h
        tl.store(dst + d[None, :] * stride_o_d, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,  # [B, H, S, D] fp32
    part_lse_ptr,  # [B, H, S] fp32
    out_ptr,
    num_heads,
    num_splits,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    HEAD_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    bh = b.to(tl.int64) * num_heads + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + bh * num_splits + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    live = s_mask & (lse > float("-inf"))
    part = tl.load(
        part_out_ptr + ((bh * num_splits + s) * HEAD_SIZE)[:, None] + d[None, :],
        mask=live[:, None] & (d[None, :] < HEAD_SIZE),
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    dst = out_ptr + b.to(tl.int64) * stride_o_b + h * stride_o_h + d * stride_o_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_SIZE)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps the default cheap
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(
    batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int
) -> int:
    """Split count from shapes only: fill about two programs per SM, never splits
    shorter than ``_MIN_SPLIT_TILES`` key tiles of the longest possible context."""
    programs = batch * num_kv_heads
    by_occupancy = triton.cdiv(2 * num_sms, max(programs, 1))
    by_length = max(1, max_context // (_MIN_SPLIT_TILES * block_n))
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def _decode_config(head_size: int, q_dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the decode kernel.

    On an H100 (bf16, D=128, 8 KV heads) 64-token tiles with 4 warps and 3 stages were
    within 2% of the best of 27 configurations at every shape tried (B=1..256, 1k..32k
    tokens); at B=64, ctx=2k the kernel reads K/V at 0.99 of the copy bandwidth.
    """
    block_d = max(16, triton.next_power_of_2(head_size))
    if q_dtype == torch.float32 or block_d >= 256:
        return 32, 4, 2
    return 64, 4, 3


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]: one query token per sequence
    k_cache: torch.Tensor,  # [N, block_size, H_kv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32; 0 = padding row (zeros out)
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [B, H, D], q's dtype
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's last token over its ``context_lens[b]`` cached keys."""
    check_tensor("q", q, 3, FLOAT_DTYPES)
    _, block_size, num_kv_heads, head_size = check_kv_caches(k_cache, v_cache)
    batch, num_heads = q.shape[0], q.shape[1]
    _check_heads(q, num_kv_heads, head_size)
    _check_tables(block_tables, context_lens, batch, "batch")
    scale = _check_scale(scale)
    out = check_out(out, q)
    check_devices(_decode_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                  block_tables=block_tables, context_lens=context_lens, out=out)
    default_n, num_warps, num_stages = _decode_config(head_size, q.dtype)
    block_n = _check_block("block_n", block_n, default_n)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = default_num_splits(
            batch, num_kv_heads, max_context, block_n, _num_sms(q.device)
        )
    if not isinstance(num_splits, int) or not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {_MAX_SPLITS}], got {num_splits!r}")
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_size))
    split = num_splits > 1
    if split:
        part_out = torch.empty(batch, num_heads, num_splits, head_size, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel
    precision, upcast = _dot_mode(q.dtype, _decode_kernel)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        num_splits,
        *q.stride(),
        *k_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SPLIT=split,
        INDEX_64=_needs_int64(k_cache),
        PRECISION=precision,
        UPCAST=upcast,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        _merge_splits_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            num_heads,
            num_splits,
            *out.stride(),
            HEAD_SIZE=head_size,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=block_d,
            num_warps=4 if num_splits * block_d >= 2048 else 2,
        )
    return out


# ---------------------------------------------------------------------------- prefill


@triton.jit
def _prefill_tile(
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
    INDEX_64: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax over key tiles ``[n_start, n_end)``; CAUSAL masks key > q_pos."""
    for n0 in range(n_start, n_end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        t_mask = tok < n_end  # all true below the diagonal (n_end is a tile boundary)
        block = tl.load(table + (tok // BLOCK_SIZE) * stride_bt_w, mask=t_mask, other=0)
        row = _index(block, INDEX_64) * stride_c_n + (tok % BLOCK_SIZE) * stride_c_b + head_off
        kv_off = row[:, None] + d[None, :] * stride_c_d
        kv_mask = _kv_mask(t_mask, d, HEAD_SIZE, BLOCK_D)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            s = tl.where(tok[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if CAUSAL:
            # A row whose position precedes every key so far (only on inconsistent
            # inputs) keeps m = -inf; subtract 0 instead so it yields zeros, not NaN.
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, PRECISION, UPCAST)
        m_i = m_new
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
            m_i, l_i, acc = _prefill_tile(
                q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_off, d,
                0, n_full, qk_scale, stride_c_n, stride_c_b, stride_c_d, stride_bt_w,
                HEAD_SIZE, BLOCK_SIZE, BLOCK_D, BLOCK_N, False, INDEX_64, PRECISION, UPCAST,
            )
            m_i, l_i, acc = _prefill_tile(
                q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_off, d,
                n_full, first + last + 1, qk_scale, stride_c_n, stride_c_b, stride_c_d,
                stride_bt_w, HEAD_SIZE, BLOCK_SIZE, BLOCK_D, BLOCK_N, True, INDEX_64, PRECISION,
                UPCAST,
            )
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            dst = out_ptr + rows[:, None] * stride_o_t + heads[:, None] * stride_o_h
            tl.store(dst + d[None, :] * stride_o_d, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def _prefill_config(
    head_size: int, group: int, q_dtype: torch.dtype, tiles_of_128: int, num_sms: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel.

    Measured on an H100 (bf16, 32 query / 8 KV heads, one causal prompt; see
    benchmarks/tune_attention.py): D=128 runs best at 128x64 with 4 warps once there are
    a few waves of programs (416 TFLOP/s at 4k tokens, 360 at 2k), but at 1k tokens
    64-row tiles win (284 vs 201), hence the switch on ``tiles_of_128``, the program
    count that 128-row tiles would give (256 at 1k, 512 at 2k on 132 SMs). D=64 prefers
    64x64, D=256 128x64 with 8 warps.
    """
    block_d = max(16, triton.next_power_of_2(head_size))
    if q_dtype == torch.float32:  # not a serving dtype: sized to fit, not tuned
        block_m, block_n, warps, stages = (32 if block_d >= 256 else 64), 32, 4, 2
    elif block_d >= 256:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    elif block_d >= 128 and tiles_of_128 >= 3 * num_sms:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 2
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


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
) -> torch.Tensor:
    """Causal attention of variable-length query runs over their paged context.

    ``max_query_len`` must be at least the longest run (rows past it stay unwritten);
    rows after ``query_start_loc[S]`` are zeroed.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    _, block_size, num_kv_heads, head_size = check_kv_caches(k_cache, v_cache)
    num_tokens, num_heads = q.shape[0], q.shape[1]
    _check_heads(q, num_kv_heads, head_size)
    num_seqs = context_lens.shape[0] if isinstance(context_lens, torch.Tensor) else 0
    _check_tables(block_tables, context_lens, num_seqs, "sequence")
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
    scale = _check_scale(scale)
    out = check_out(out, q)
    check_devices(_prefill_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                  block_tables=block_tables, query_start_loc=query_start_loc,
                  context_lens=context_lens, out=out)
    group = num_heads // num_kv_heads
    tiles_of_128 = num_kv_heads * num_seqs * triton.cdiv(max_query_len, max(1, 128 // group))
    default_m, default_n, num_warps, num_stages = _prefill_config(
        head_size, group, q.dtype, tiles_of_128, _num_sms(q.device)
    )
    block_m = _check_block("block_m", block_m, default_m)
    block_n = _check_block("block_n", block_n, default_n)
    if block_m < group:
        raise ValueError(f"block_m {block_m} must hold one token's {group} query heads")
    if num_tokens == 0:
        return out

    tokens_per_tile = block_m // group
    num_tiles = max(1, triton.cdiv(max_query_len, tokens_per_tile))
    precision, upcast = _dot_mode(q.dtype, _prefill_kernel)
    _prefill_kernel[(num_kv_heads, num_tiles, num_seqs + 1)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        scale * _LOG2E,
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
        INDEX_64=_needs_int64(k_cache),
        PRECISION=precision,
        UPCAST=upcast,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# ---------------------------------------------------------------------------- helpers


def _check_heads(q: torch.Tensor, num_kv_heads: int, head_size: int) -> None:
    num_heads = q.shape[1]
    if q.shape[2] != head_size:
        raise ValueError(f"q head size {q.shape[2]} differs from the cache's {head_size}")
    if head_size > _MAX_HEAD_SIZE:
        raise ValueError(f"head size {head_size} is above the supported {_MAX_HEAD_SIZE}")
    if num_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads is not a positive multiple of {num_kv_heads} KV heads"
        )


def _check_tables(
    block_tables: torch.Tensor, context_lens: torch.Tensor, rows: int, what: str
) -> None:
    check_tensor("block_tables", block_tables, 2, INDEX_DTYPES)
    check_tensor("context_lens", context_lens, 1, INDEX_DTYPES)
    if block_tables.shape[0] != rows or context_lens.shape[0] != rows:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens "
            f"{tuple(context_lens.shape)} must have one row per {what} ({rows})"
        )


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return float(scale)


def _check_block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
    return value


def _needs_int64(cache: torch.Tensor) -> bool:
    """Whether element offsets into ``cache`` can reach 2**31 (from its shape and strides)."""
    last = sum((n - 1) * abs(s) for n, s in zip(cache.shape, cache.stride(), strict=True))
    return last >= 2**31 - 1


def _dot_mode(q_dtype: torch.dtype, kernel: object) -> tuple[str, bool]:
    """(input_precision, upcast-in-interpreter) of the kernels' dot products."""
    precision = "ieee" if q_dtype == torch.float32 else "tf32"
    return precision, interpreted(kernel) and q_dtype == torch.bfloat16
