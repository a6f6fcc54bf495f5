"""Triton attention kernels (``kernels.kv_cache``, ``kernels.paged_decode``,
``kernels.paged_prefill``) against the float32 torch references of
``kernels.attention_reference``.

On a machine without CUDA they run under ``TRITON_INTERPRET=1`` (see conftest.py), so
shapes are small and the parameter sets are chosen by hand to cover each axis (dtype,
head size, block size, GQA ratio, split-KV, tile sizes) without the full product.
Every case draws fresh inputs from its own seed, poisons the output with NaN, uses
shuffled block tables whose unused entries point far outside the pool, and includes a
padding row. ``realistic`` cases and the CUDA-graph test run only on a GPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tessera.kernels.attention_reference import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)
from tessera.kernels.kv_cache import write_kv
from tessera.kernels.paged_decode import paged_decode_attention
from tessera.kernels.paged_prefill import PrefillConfig, paged_prefill_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
UNUSED_BLOCK = 1 << 30  # block-table padding: any read through it is out of bounds
cuda_only = pytest.mark.skipif(not CUDA, reason="realistic sizes run on a CUDA device only")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's own id: fresh, reproducible inputs per case."""
    g = torch.Generator(device=DEVICE)
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def make_pool(gen, ctx_lens, block_size, num_kv_heads, head_size, dtype, *, extra_width=2):
    """Random caches and a block table that hands out shuffled, non-contiguous blocks.

    The table is a column slice of a wider tensor (a non-unit row stride) and every
    entry past a sequence's own blocks is ``UNUSED_BLOCK``.
    """
    needed = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(needed) + 3
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).to(torch.int32)
    width = max(needed, default=0) + extra_width
    wide = torch.full((len(ctx_lens), width + 3), UNUSED_BLOCK, dtype=torch.int32, device=DEVICE)
    start = 0
    for i, n in enumerate(needed):
        wide[i, :n] = perm[start : start + n]
        start += n
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = randn(gen, *shape, dtype=dtype)
    v_cache = randn(gen, *shape, dtype=dtype)
    return k_cache, v_cache, wide[:, :width]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "some output elements were not written"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize(
    "src_dtype, cache_dtype, block_size, num_kv_heads, head_size",
    [
        (torch.bfloat16, torch.bfloat16, 16, 2, 64),
        (torch.float32, torch.bfloat16, 32, 8, 128),  # cast on store
        (torch.float16, torch.float32, 8, 3, 80),  # odd head count, non-power-of-2 D
        (torch.bfloat16, torch.float8_e4m3fn, 16, 2, 64),  # the fp8 KV cache: bit-exact
        (torch.float32, torch.float8_e4m3fn, 8, 3, 80),
    ],
)
def test_write_kv(gen, src_dtype, cache_dtype, block_size, num_kv_heads, head_size):
    num_tokens, num_blocks = 13, 5
    # k and v are column slices of one fused qkv row, as the model produces them.
    kv_width = num_kv_heads * head_size
    qkv = randn(gen, num_tokens, 3 * kv_width, dtype=src_dtype)
    k = qkv[:, kv_width : 2 * kv_width].view(num_tokens, num_kv_heads, head_size)
    v = qkv[:, 2 * kv_width :].view(num_tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:num_tokens]
    slots[[2, 7]] = -1  # padding rows write nothing
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache, v_cache = randn(gen, *shape, dtype=cache_dtype), randn(gen, *shape, dtype=cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    if cache_dtype == torch.float8_e4m3fn:  # out of fp8's range: saturates, never NaN
        k[0, 0, :2] = torch.tensor([1000.0, -3000.0], dtype=src_dtype, device=DEVICE)
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_ref(k, v, k_ref, v_ref, slots)
    # A copy is exact. The interpreter truncates fp32 -> bf16 where the GPU rounds to
    # nearest even, so a narrowing cast there may differ by one unit in the last place.
    narrowing = src_dtype.itemsize > cache_dtype.itemsize
    rtol = 2.0**-7 if narrowing and not CUDA and cache_dtype.itemsize > 1 else 0.0
    if cache_dtype == torch.float8_e4m3fn:
        written = k_cache.view(-1, num_kv_heads, head_size)[slots[0]].float()
        assert written[0, :2].tolist() == [448.0, -448.0]
        k_cache, k_ref = k_cache.float(), k_ref.float()
        v_cache, v_ref = v_cache.float(), v_ref.float()
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)

    if cache_dtype == torch.float8_e4m3fn:
        return
    k_cache.copy_(k_ref)
    write_kv(k, v, k_cache, v_cache, slots.to(torch.int32))  # int32 slots, same result
    torch.testing.assert_close(k_cache, k_ref, rtol=rtol, atol=0.0)


def test_write_kv_into_fp8_saturates(gen):
    """Values past float8's range are stored as +-448 (a plain cast would store NaN);
    values it holds exactly are stored exactly."""
    k = torch.tensor([[[1000.0, -3000.0, 448.0, 1.5, -0.25, 0.0, 96.0, 2.0**-9]]],
                     device=DEVICE)  # [T=1, H_kv=1, D=8]
    v = -k
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.float8_e4m3fn, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    write_kv(k, v, k_cache, v_cache, torch.tensor([5], device=DEVICE))
    want = [448.0, -448.0, 448.0, 1.5, -0.25, 0.0, 96.0, 2.0**-9]
    assert k_cache[1, 1, 0].float().tolist() == want
    assert v_cache[1, 1, 0].float().tolist() == [-w for w in want]
    assert not k_cache[0].float().any() and not k_cache[1, [0, 2, 3]].float().any()


# ------------------------------------------------------------------------------ decode

DECODE_CASES = [
    # dtype, cache dtype, head size, block size, GQA group, num_splits, block_n
    pytest.param(torch.float32, torch.float32, 64, 16, 1, 1, None, id="fp32-d64-bs16-g1"),
    pytest.param(torch.float32, torch.float32, 128, 32, 3, 3, None, id="fp32-d128-bs32-g3-s3"),
    pytest.param(torch.bfloat16, torch.bfloat16, 128, 16, 8, 1, None, id="bf16-d128-bs16-g8"),
    pytest.param(torch.bfloat16, torch.bfloat16, 64, 32, 8, 4, 16, id="bf16-d64-bs32-g8-s4-n16"),
    pytest.param(torch.bfloat16, torch.bfloat16, 128, 16, 1, 2, None, id="bf16-d128-bs16-g1-s2"),
    pytest.param(torch.float16, torch.float16, 64, 16, 3, None, None, id="fp16-d64-bs16-g3-auto"),
    pytest.param(torch.float16, torch.float16, 96, 8, 2, 5, 32, id="fp16-d96-bs8-g2-s5"),
    pytest.param(torch.float32, torch.bfloat16, 128, 16, 3, 2, None, id="q32-kvbf16-d128-g3"),
    pytest.param(torch.bfloat16, torch.float8_e4m3fn, 128, 16, 8, 2, None, id="bf16-kvfp8-g8-s2"),
    pytest.param(torch.float32, torch.float8_e4m3fn, 64, 32, 3, 1, None, id="q32-kvfp8-d64-g3"),
]


@pytest.mark.parametrize("dtype, cache_dtype, head_size, block_size, group, splits, block_n",
                         DECODE_CASES)
def test_paged_decode(gen, dtype, cache_dtype, head_size, block_size, group, splits, block_n):
    num_kv_heads = 2
    # Odd lengths, a one-token context, a padding row (0) and one over several tiles.
    ctx = [1, 0] + torch.randint(2, 150, (3,), generator=gen, device=DEVICE).tolist()
    ctx = [c | 1 if c > 1 else c for c in ctx]
    k_cache, v_cache, table = make_pool(gen, ctx, block_size, num_kv_heads, head_size,
                                        cache_dtype)
    q = randn(gen, len(ctx), num_kv_heads * group, head_size, dtype=dtype)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    scale = head_size**-0.5
    out = torch.full_like(q, float("nan"))

    got = paged_decode_attention(q, k_cache, v_cache, table, context_lens, scale, out=out,
                                 num_splits=splits, block_n=block_n)
    assert got is out
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, context_lens, scale)
    assert_close(out, ref, dtype)
    assert not out[1].any(), "a padding row (context_len 0) must be zeros"


def test_paged_decode_splits_agree(gen):
    """One split and many splits give the same answer (the merge is exact up to rounding)."""
    ctx = [203, 64, 1]
    k_cache, v_cache, table = make_pool(gen, ctx, 16, 1, 64, torch.float32)
    q = randn(gen, 3, 4, 64)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    one = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.1, num_splits=1)
    many = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.1, num_splits=7,
                                  block_n=16)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- prefill

PREFILL_CASES = [
    # dtype, head size, block size, GQA group, block_m, block_n (None = GPU default)
    pytest.param(torch.float32, 64, 16, 1, 16, 16, id="fp32-d64-bs16-g1-m16n16"),
    pytest.param(torch.float32, 128, 32, 3, 16, 32, id="fp32-d128-bs32-g3-m16n32"),
    pytest.param(torch.bfloat16, 128, 16, 8, None, None, id="bf16-d128-bs16-g8-default"),
    pytest.param(torch.bfloat16, 64, 32, 3, 32, 16, id="bf16-d64-bs32-g3-m32n16"),
    pytest.param(torch.bfloat16, 64, 16, 1, None, None, id="bf16-d64-bs16-g1-default"),
    pytest.param(torch.float16, 128, 16, 8, 16, 64, id="fp16-d128-bs16-g8-m16n64"),
    pytest.param(torch.float16, 32, 8, 2, 32, 32, id="fp16-d32-bs8-g2-m32n32"),
]


def prefill_batch(gen, cached_and_new: list[tuple[int, int]], pad_tokens: int):
    """(query_start_loc, context_lens, num_tokens, max_query_len) for sequences given as
    (tokens already cached, new query tokens), with ``pad_tokens`` trailing pad rows."""
    q_lens = [n for _, n in cached_and_new]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    ctx = [c + n for c, n in cached_and_new]
    return (
        torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
        qsl[-1] + pad_tokens,
        max(q_lens),
    )


@pytest.mark.parametrize("dtype, head_size, block_size, group, block_m, block_n", PREFILL_CASES)
def test_paged_prefill(gen, dtype, head_size, block_size, group, block_m, block_n):
    num_kv_heads = 2
    r = torch.randint(1, 60, (4,), generator=gen, device=DEVICE).tolist()
    seqs = [
        (0, 2 * r[0] + 1),  # a fresh prompt of odd length
        (2 * r[1] + 1, 1),  # a decode mixed into the batch
        (r[2] + 17, 2 * r[3] + 3),  # a chunk over a cached prefix
        (0, 0),  # a padding sequence with no tokens
        (0, 1),  # a one-token prompt
    ]
    qsl, context_lens, num_tokens, max_q = prefill_batch(gen, seqs, pad_tokens=3)
    k_cache, v_cache, table = make_pool(gen, context_lens.tolist(), block_size, num_kv_heads,
                                        head_size, dtype)
    # q is a column slice of a fused qkv tensor: a non-unit token stride.
    num_heads = num_kv_heads * group
    qkv = randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype)
    q = qkv[:, : num_heads * head_size].view(num_tokens, num_heads, head_size)
    scale = head_size**-0.5
    out = torch.full((num_tokens, num_heads, head_size), float("nan"), dtype=dtype,
                     device=DEVICE)

    paged_prefill_attention(q, k_cache, v_cache, table, qsl, context_lens, scale,
                            max_query_len=max_q, out=out, block_m=block_m, block_n=block_n)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, context_lens, scale)
    assert_close(out, ref, dtype)
    assert not out[-3:].any(), "padding rows after the last sequence must be zeros"



# The kernel's code variants (PrefillConfig flags), each on small tiles so that a short
# batch crosses many key tiles: page sizes below, equal to and above BLOCK_N.
VARIANTS = {
    "unmasked": dict(mask_full=False),
    "page": dict(mask_full=False, page_reads=True),
    "ahead": dict(mask_full=False, ahead=True),
    "page-ahead": dict(mask_full=False, page_reads=True, ahead=True),
    "lazy": dict(mask_full=False, page_reads=True, ahead=True, lazy_rescale=True),
    "overlap": dict(mask_full=False, overlap=True),
    "overlap-page-ahead": dict(mask_full=False, page_reads=True, ahead=True, overlap=True),
    "overlap-lazy": dict(mask_full=False, page_reads=True, ahead=True, overlap=True,
                         lazy_rescale=True),
}
VARIANT_CASES = [
    # variant, dtype, head size, block size, GQA group, block_m, block_n
    pytest.param(v, dt, hs, bs, g, bm, bn, id=f"{v}-{str(dt)[6:]}-d{hs}-bs{bs}-g{g}-m{bm}n{bn}")
    for v, dt, hs, bs, g, bm, bn in [
        ("unmasked", torch.float32, 64, 16, 4, 32, 16),
        ("page", torch.float32, 64, 8, 4, 32, 32),  # 4 pages per key tile
        ("page", torch.bfloat16, 128, 64, 2, 32, 16),  # 4 key tiles per page
        ("ahead", torch.float32, 128, 16, 3, 32, 32),  # 2 pages per tile, dead rows
        ("page-ahead", torch.float32, 64, 8, 4, 16, 16),  # BLOCK_M = 4 tokens
        ("page-ahead", torch.bfloat16, 128, 32, 4, 64, 32),  # page = tile
        ("page-ahead", torch.float32, 64, 12, 4, 32, 16),  # pages straddle tiles
        ("lazy", torch.float32, 64, 16, 4, 32, 16),
        ("overlap", torch.float32, 64, 16, 1, 16, 16),
        ("overlap", torch.bfloat16, 128, 8, 4, 32, 32),
        ("overlap-page-ahead", torch.float32, 64, 64, 4, 32, 16),
        ("overlap-page-ahead", torch.float16, 128, 8, 2, 32, 32),
        ("overlap-lazy", torch.float32, 128, 16, 4, 32, 16),
    ]
]


@pytest.mark.parametrize(
    "variant, dtype, head_size, block_size, group, block_m, block_n", VARIANT_CASES
)
def test_paged_prefill_variants(gen, variant, dtype, head_size, block_size, group, block_m,
                                block_n):
    num_kv_heads = 2
    seqs = [
        (0, 45),  # a fresh prompt: whole key tiles below its later query tiles
        (37, 1),  # a decode
        (83, 12),  # a chunk over a cached prefix of many whole tiles
        (0, 0),  # a padding sequence with no tokens
        (0, 3),  # a prompt shorter than one key tile: no whole tile at all
        (block_n - 5, 5),  # a chunk ending exactly on a tile boundary: one whole tile
    ]
    qsl, context_lens, num_tokens, max_q = prefill_batch(gen, seqs, pad_tokens=2)
    k_cache, v_cache, table = make_pool(gen, context_lens.tolist(), block_size, num_kv_heads,
                                        head_size, dtype)
    # Keys 48..63 of the chunk's prefix score far higher: its running max jumps by more
    # than the lazy rescale's slack mid-sequence (and by less on the other tiles).
    k_cache[table[2, 48 // block_size : max(64 // block_size, 48 // block_size + 1)].long()] *= 4
    num_heads = num_kv_heads * group
    q = randn(gen, num_tokens, num_heads, head_size, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    config = PrefillConfig(block_m, block_n, 4, 2, **VARIANTS[variant])
    scale = head_size**-0.5
    paged_prefill_attention(q, k_cache, v_cache, table, qsl, context_lens, scale,
                            max_query_len=max_q, out=out, config=config)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, context_lens, scale)
    assert_close(out, ref, dtype)
    assert not out[-2:].any(), "padding rows after the last sequence must be zeros"

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_prefill_over_an_fp8_pool(gen, dtype):
    """K/V stored as float8 are widened to the query's dtype: the reference reads the
    same float8 values, so the tolerance is the query dtype's."""
    num_kv_heads, group, head_size = 2, 3, 64
    seqs = [(0, 23), (31, 1), (40, 9)]  # a prompt, a decode, a chunk over a prefix
    qsl, context_lens, num_tokens, max_q = prefill_batch(gen, seqs, pad_tokens=0)
    k_cache, v_cache, table = make_pool(gen, context_lens.tolist(), 16, num_kv_heads,
                                        head_size, torch.float8_e4m3fn)
    q = randn(gen, num_tokens, num_kv_heads * group, head_size, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, table, qsl, context_lens, head_size**-0.5,
                            max_query_len=max_q, out=out)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, context_lens,
                                      head_size**-0.5)
    assert_close(out, ref, dtype)


def test_prefill_matches_decode_for_single_tokens(gen):
    """A batch of one-token queries through the prefill kernel equals the decode kernel."""
    ctx = [77, 1, 33]
    k_cache, v_cache, table = make_pool(gen, ctx, 16, 2, 64, torch.float32)
    q = randn(gen, 3, 6, 64)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    dec = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125, num_splits=2)
    pre = paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, 0.125,
                                  max_query_len=1, block_m=16, block_n=16)
    torch.testing.assert_close(dec, pre, atol=1e-5, rtol=1e-5)


def test_write_then_prefill_then_decode(gen):
    """The three kernels chained as the executor runs them: a prompt, then a decode step."""
    block_size, h_kv, group, d, prompt = 16, 2, 3, 64, 29
    num_blocks = 6
    k_cache = torch.zeros(num_blocks, block_size, h_kv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[4, 1, 5]], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(prompt + 1, device=DEVICE)
    slots = table[0].long()[pos // block_size] * block_size + pos % block_size
    k, v = randn(gen, prompt + 1, h_kv, d), randn(gen, prompt + 1, h_kv, d)
    q = randn(gen, prompt + 1, h_kv * group, d)

    write_kv(k[:prompt], v[:prompt], k_cache, v_cache, slots[:prompt])
    qsl = torch.tensor([0, prompt], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([prompt], dtype=torch.int32, device=DEVICE)
    pre = paged_prefill_attention(q[:prompt], k_cache, v_cache, table, qsl, lens, 0.125,
                                  max_query_len=prompt, block_m=16, block_n=16)
    write_kv(k[prompt:], v[prompt:], k_cache, v_cache, slots[prompt:])
    dec = paged_decode_attention(q[prompt:], k_cache, v_cache, table, lens + 1, 0.125)

    # Dense causal attention over the unpaged K/V is the whole-sequence answer.
    kk = k.repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
    vv = v.repeat_interleave(group, 1).transpose(0, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, is_causal=True, scale=0.125
    ).transpose(0, 1)
    torch.testing.assert_close(pre, dense[:prompt], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec, dense[prompt:], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------- validation


def _decode_args():
    k_cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    return dict(
        q=torch.zeros(3, 4, 64, device=DEVICE),
        k_cache=k_cache,
        v_cache=k_cache.clone(),
        block_tables=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE),
        context_lens=torch.ones(3, dtype=torch.int32, device=DEVICE),
        scale=0.125,
    )


def _prefill_args():
    args = _decode_args()
    args["query_start_loc"] = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    args["max_query_len"] = 1
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.zeros(3, 4, 32)), "head size"),
        (dict(q=torch.zeros(3, 3, 64)), "multiple of 2 KV heads"),
        (dict(q=torch.zeros(3, 4, 64, dtype=torch.int32)), "q must be one of"),
        (dict(q=torch.zeros(12, 64)), "3 dimensions"),
        (dict(v_cache=torch.zeros(4, 16, 2, 64, dtype=torch.float16)), "v_cache is"),
        (dict(v_cache=torch.zeros(4, 8, 2, 64)), "differ in shape"),
        (dict(block_tables=torch.zeros(3, 2)), "block_tables must be one of"),
        (dict(context_lens=torch.ones(2, dtype=torch.int32)), "one row per batch"),
        (dict(scale=-1.0), "positive"),
        (dict(scale=torch.tensor(0.1)), "Python float"),
        (dict(out=torch.zeros(3, 4, 64, dtype=torch.float16)), "out must be"),
        (dict(num_splits=0), "num_splits"),
        (dict(block_n=24), "power of two"),
    ],
)
def test_decode_rejects_bad_arguments(change, match):
    args = _decode_args()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32)), "S \\+ 1"),
        (dict(query_start_loc=torch.zeros(4)), "query_start_loc must be one of"),
        (dict(max_query_len=-1), "max_query_len"),
        (dict(max_query_len=4), "exceeds"),
        (dict(block_m=16, q=torch.zeros(3, 64, 64)), "block_m 16 must hold"),
        (dict(config=(64, 64, 4, 2)), "config must be a PrefillConfig"),
    ],
)
def test_prefill_rejects_bad_arguments(change, match):
    args = _prefill_args()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(**args)


@pytest.mark.parametrize(
    "fields, match",
    [((24, 64, 4, 2), "block_m must be a power of two"), ((64, 64, 3, 2), "num_warps")],
)
def test_prefill_config_rejects_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        PrefillConfig(*fields)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=torch.zeros(5, 128)), "3 dimensions"),
        (dict(v=torch.zeros(5, 2, 32)), "differ in shape"),
        (dict(k=torch.zeros(5, 2, 32), v=torch.zeros(5, 2, 32)), "cache holds"),
        (dict(slot_mapping=torch.zeros(5)), "slot_mapping must be one of"),
        (dict(slot_mapping=torch.zeros(4, dtype=torch.int64)), "4 entries for 5 tokens"),
        (dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.int8)), "k_cache must be one of"),
    ],
)
def test_write_kv_rejects_bad_arguments(change, match):
    k_cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    args = dict(
        k=torch.zeros(5, 2, 64, device=DEVICE),
        v=torch.zeros(5, 2, 64, device=DEVICE),
        k_cache=k_cache,
        v_cache=k_cache.clone(),
        slot_mapping=torch.zeros(5, dtype=torch.int64, device=DEVICE),
    )
    args.update({k: v.to(DEVICE) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        write_kv(**args)


# ----------------------------------------------------------------- realistic (GPU only)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch, max_ctx", [(64, 2048), (3, 9000)])
def test_realistic_decode(gen, dtype, batch, max_ctx):
    h_kv, group, d, block_size = 8, 4, 128, 16
    ctx = torch.randint(1, max_ctx, (batch,), generator=gen, device=DEVICE).tolist()
    ctx[0] = max_ctx
    k_cache, v_cache, table = make_pool(gen, ctx, block_size, h_kv, d, dtype)
    q = randn(gen, batch, h_kv * group, d, dtype=dtype)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, table, lens, d**-0.5, out=out)
    assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, table, lens, d**-0.5),
                 dtype)


@cuda_only
@pytest.mark.parametrize(
    "dtype, head_size, group",
    [
        (dt, hs, g)
        for dt in (torch.bfloat16, torch.float16)
        for hs, g in ((128, 4), (64, 1), (256, 2), (96, 8))
    ]
    + [(torch.float32, 256, 2), (torch.float32, 128, 4)],
)
def test_realistic_prefill(gen, dtype, head_size, group):
    _check_realistic_prefill(gen, dtype, head_size, group, block_size=16)


def _check_realistic_prefill(gen, dtype, head_size, group, block_size, config=None):
    """Five sequences of 1 to 2,048 new tokens over cached prefixes of 0 to 2,047, with
    padding tokens after them, against the reference."""
    h_kv = 4
    seqs = [(0, 1500), (700, 513), (2047, 1), (0, 2048), (31, 97)]
    qsl, lens, num_tokens, max_q = prefill_batch(gen, seqs, pad_tokens=5)
    k_cache, v_cache, table = make_pool(gen, lens.tolist(), block_size, h_kv, head_size, dtype)
    q = randn(gen, num_tokens, h_kv * group, head_size, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_size**-0.5
    paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, scale, max_query_len=max_q,
                            out=out, config=config)  # fmt: skip
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, lens, scale)
    assert_close(out, ref, dtype)


@cuda_only
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head_size, group, block_size, tiles", [
    (128, 4, 16, (128, 64, 8, 3)), (128, 4, 16, (64, 64, 4, 2)), (64, 1, 32, (128, 128, 8, 2)),
])
def test_realistic_prefill_variants(gen, variant, head_size, group, block_size, tiles):
    """Each variant compiled for the device at the sweep's tile shapes (pipelining and
    wgmma scheduling differ from the interpreter's sequential run)."""
    config = PrefillConfig(*tiles, **VARIANTS[variant])
    _check_realistic_prefill(gen, torch.bfloat16, head_size, group, block_size, config)


def _compiled(kernel) -> int:
    """How many variants of a Triton kernel have been compiled in this process."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@cuda_only
def test_step_sizes_do_not_trigger_compiles(gen):
    """Token counts, sequence counts, block-table widths and split counts change every
    serving step; none of them may select a new compiled variant (Triton specialises
    integers on == 1 and % 16 unless told not to)."""
    from tessera.kernels.paged_decode import _decode_kernel
    from tessera.kernels.paged_prefill import _prefill_kernel

    h_kv, group, d, block_size, dtype = 4, 4, 128, 16, torch.bfloat16
    seen = {}
    # (cached, new) per sequence and the table's extra width: 1, 16 and 33 tokens;
    # 1, 2 and 16 sequences; row strides 1..19.
    for seqs, extra in [
        ([(0, 33), (5, 16)], 0),
        ([(0, 1)], 0),
        ([(3, 16)] * 16, 3),
        ([(40, 7), (0, 100), (17, 1)], 11),
    ]:
        qsl, lens, num_tokens, max_q = prefill_batch(gen, seqs, pad_tokens=0)
        k_cache, v_cache, table = make_pool(
            gen, lens.tolist(), block_size, h_kv, d, dtype, extra_width=extra
        )
        q = randn(gen, num_tokens, h_kv * group, d, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, d**-0.5,
                                max_query_len=max_q, out=out, block_m=64, block_n=64)
        ref = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, lens, d**-0.5)
        assert_close(out, ref, dtype)
        seen.setdefault("prefill", _compiled(_prefill_kernel))
        assert _compiled(_prefill_kernel) == seen["prefill"], f"{seqs} compiled anew"
    for batch, splits, extra in [(1, 2, 0), (16, 3, 5), (5, 16, 16), (33, 7, 1)]:
        ctx = torch.randint(1, 700, (batch,), generator=gen, device=DEVICE).tolist()
        k_cache, v_cache, table = make_pool(
            gen, ctx, block_size, h_kv, d, dtype, extra_width=extra
        )
        q = randn(gen, batch, h_kv * group, d, dtype=dtype)
        lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k_cache, v_cache, table, lens, d**-0.5, out=out,
                               num_splits=splits)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, d**-0.5)
        assert_close(out, ref, dtype)
        seen.setdefault("decode", _compiled(_decode_kernel))
        assert _compiled(_decode_kernel) == seen["decode"], f"batch {batch} compiled anew"


@cuda_only
def test_decode_and_write_kv_capture_in_cuda_graph(gen):
    """No host synchronisation: capture once, replay with new lengths and new K/V."""
    batch, h_kv, group, d, block_size, width = 8, 2, 4, 128, 16, 64
    dtype = torch.bfloat16
    k_cache, v_cache, table = make_pool(gen, [width * block_size] * batch, block_size, h_kv,
                                        d, dtype, extra_width=0)
    q = randn(gen, batch, h_kv * group, d, dtype=dtype)
    k_new, v_new = randn(gen, batch, h_kv, d, dtype=dtype), randn(gen, batch, h_kv, d, dtype=dtype)
    lens = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
    out = torch.empty_like(q)

    def step():
        write_kv(k_new, v_new, k_cache, v_cache, slots)
        paged_decode_attention(q, k_cache, v_cache, table, lens, d**-0.5, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        new_lens = torch.randint(0, width * block_size, (batch,), generator=gen, device=DEVICE)
        new_lens[trial] = 0  # a padding row
        pos = (new_lens - 1).clamp(min=0)
        new_slots = table.long()[torch.arange(batch, device=DEVICE), pos // block_size]
        new_slots = new_slots * block_size + pos % block_size
        new_slots[trial] = -1
        lens.copy_(new_lens.to(torch.int32))
        slots.copy_(new_slots)
        q.copy_(randn(gen, batch, h_kv * group, d, dtype=dtype))
        k_new.copy_(randn(gen, batch, h_kv, d, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, d**-0.5)
        assert_close(out, ref, dtype)


def test_int64_pool_offsets(gen, monkeypatch):
    """The 64-bit offset path (pools past 2**31 elements) computes the same thing."""
    import tessera.kernels._paged_common as pa

    ctx = [45, 1]
    k_cache, v_cache, table = make_pool(gen, ctx, 16, 2, 64, torch.float32)
    q = randn(gen, 2, 4, 64)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    want_dec = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.1, num_splits=2)
    want_pre = paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, 0.1,
                                       max_query_len=1, block_m=16, block_n=16)
    needs_int64 = pa.needs_int64
    monkeypatch.setattr(pa, "needs_int64", lambda cache: True)
    got_dec = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.1, num_splits=2)
    got_pre = paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, 0.1,
                                      max_query_len=1, block_m=16, block_n=16)
    torch.testing.assert_close(got_dec, want_dec, atol=0, rtol=0)
    torch.testing.assert_close(got_pre, want_pre, atol=0, rtol=0)
    assert not needs_int64(k_cache)
    assert needs_int64(torch.empty(2**17, 16, 8, 128, device="meta"))  # 2**31 elements
    assert not needs_int64(torch.empty(2**17 - 1, 16, 8, 128, device="meta"))
