"""What the paged attention kernels (``paged_decode``, ``paged_prefill``) share: the
layout of the block-table KV pool they read, the ``@triton.jit`` helpers both kernels
inline to gather and multiply K/V tiles (underscored, like the kernels), and the host
helpers both launchers call (offset width, dot precision, SM count).

Keys and values of one layer live in ``k_cache``/``v_cache`` ``[N, B, H_kv, D]``;
token ``p`` of a sequence is row ``p % B`` of block ``block_table[p // B]``. Both
kernels gather a key tile of ``BLOCK_N`` tokens (several pool blocks) per step through
the block table, one ``int32`` table read per token (prefill can read one per page: see
its DESIGN), and keep an online softmax in fp32 with base-2 exponentials (scores are
scaled by ``scale * log2(e)`` once). Pool offsets are computed in int32 unless the
pool's shape and strides can reach 2**31 elements (``INDEX_64``): the 64-bit
arithmetic took ~11% of prefill time on an H100.

GQA: a program serves every query head of one KV head, so each K/V tile is read once
for the whole group. The group's rows are packed into the M dimension of ``tl.dot``:

    decode   rows = the G = H / H_kv heads of one token, padded to >= 16 rows
    prefill  rows = (token, head) pairs: row r = token r // G, head r % G
             BLOCK_M rows = BLOCK_M // G tokens (dead rows masked when G does not divide)

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

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import interpreted

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) = exp2(x * log2(e))


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


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps the default cheap
    return torch.cuda.get_device_properties(device).multi_processor_count


def needs_int64(cache: torch.Tensor) -> bool:
    """Whether element offsets into ``cache`` can reach 2**31 (from its shape and strides)."""
    last = sum((n - 1) * abs(s) for n, s in zip(cache.shape, cache.stride(), strict=True))
    return last >= 2**31 - 1


def dot_mode(q_dtype: torch.dtype, kernel: object) -> tuple[str, bool]:
    """(input_precision, upcast-in-interpreter) of the kernels' dot products."""
    precision = "ieee" if q_dtype == torch.float32 else "tf32"
    return precision, interpreted(kernel) and q_dtype == torch.bfloat16
