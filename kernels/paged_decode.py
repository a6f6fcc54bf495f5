"""Paged decode attention: each sequence's one new query token over its cached keys,
split across programs along the context (split-KV), and its host launcher.

The pool layout, GQA row packing and dtype rules are ``kernels._paged_common``'s; here
a program's rows are the G = H / H_kv query heads of one token, padded to >= 16 rows.

Grid ``(B, H_kv, num_splits)``: split ``s`` of sequence ``b`` covers tokens
``[s * L, (s + 1) * L)`` with ``L = cdiv(cdiv(ctx_b, num_splits), BLOCK_N) * BLOCK_N``,
computed on the device from ``context_lens`` so the grid depends on shapes only (CUDA
graphs). With one split the program writes ``out`` directly; otherwise each writes a
normalised partial output and its log-sum-exp to an fp32 workspace and a second kernel,
grid ``(B, H)``, merges them (empty splits carry ``lse = -inf`` and weigh nothing).
The default ``num_splits`` aims at about two programs per multiprocessor and at least
``_MIN_SPLIT_TILES`` key tiles per split, from ``B``, ``H_kv`` and the block table width.

Measured on an H100 (benchmarks/bench_kernels.py, Llama-3-8B attention shapes, bf16):
decode reads K/V at 0.99 of the device-to-device copy rate at batch 64, 2k context.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels import _paged_common as paged
from tessera.kernels._attention_checks import (
    FLOAT_DTYPES,
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

_MAX_SPLITS = 128
_MIN_SPLIT_TILES = 4  # a split shorter than this many key tiles is mostly overhead


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
    check_heads(q, num_kv_heads, head_size)
    check_tables(block_tables, context_lens, batch, "batch")
    scale = check_scale(scale)
    out = check_out(out, q)
    check_devices(_decode_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                  block_tables=block_tables, context_lens=context_lens, out=out)
    default_n, num_warps, num_stages = _decode_config(head_size, q.dtype)
    block_n = check_block("block_n", block_n, default_n)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = default_num_splits(
            batch, num_kv_heads, max_context, block_n, paged.num_sms(q.device)
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
    precision, upcast = paged.dot_mode(q.dtype, _decode_kernel)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * paged.LOG2E,
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
        INDEX_64=paged.needs_int64(k_cache),
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
