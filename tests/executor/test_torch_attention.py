"""The CPU attention path (``executor.attention``) against the float32 reference, with
decodes in padded groups (plain torch) and through the fused numba kernel
(``executor.cpu_attention``).

A step mixes decodes of very different context lengths (so they split into several
padded groups) with prefill chunks that start from an empty cache or from a cached
prefix, all over block tables scattered through a shuffled pool.
"""

from __future__ import annotations

import pytest
import torch

from tessera.executor.attention import (
    DECODE_GROUP_MAX_BLOCKS,
    TorchAttentionBackend,
    build_attention_metadata,
)
from tessera.kernels.attention_reference import paged_prefill_attention_ref


def _step(seed: int, block_size: int, h_kv: int, group: int, d: int, seqs):
    """seqs: (query_len, context_len) per sequence, in batch order."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_needed) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(perm[at : at + n])
        at += n
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=g)
    num_tokens = sum(q for q, _ in seqs)
    q = torch.randn(num_tokens, h_kv * group, d, generator=g)
    return q, k_cache, v_cache, tables


def _reference(q, k_cache, v_cache, tables, seqs, scale):
    width = max(len(t) for t in tables)
    table_t = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        table_t[i, : len(t)] = torch.tensor(t)
    starts = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0)
    ctx = torch.tensor([c for _, c in seqs])
    return paged_prefill_attention_ref(q, k_cache, v_cache, table_t, starts, ctx, scale)


@pytest.mark.parametrize("fused", [False, True], ids=["groups", "fused"])
@pytest.mark.parametrize(
    "block_size,h_kv,group,d",
    [(16, 3, 3, 64), (1, 2, 1, 64), (32, 1, 8, 128), (16, 4, 8, 32)],
)
def test_mixed_step_matches_the_reference(block_size, h_kv, group, d, fused):
    # Decodes from 1 token to 37 blocks, prefills with and without a cached prefix.
    seqs = [(1, 5), (1, 600), (7, 7), (1, 33), (1, 150), (40, 95), (1, 1), (1, 590)]
    seqs += [(1, block_size * 4), (1, 320), (13, 13), (1, 17)]
    q, k_cache, v_cache, tables = _step(block_size + d, block_size, h_kv, group, d, seqs)
    backend = TorchAttentionBackend(fused_decode=fused)
    meta = backend.build_metadata(
        [ql for ql, _ in seqs], [c for _, c in seqs], tables, block_size, torch.device("cpu")
    )
    scale = d**-0.5
    if fused:  # every decode in one call, in batch order
        assert not meta.decode_groups
        assert meta.paged_decodes.rows.tolist() == [0, 1, 9, 10, 51, 52, 53, 54, 68]
        assert meta.paged_decodes.lens.tolist() == [
            5,
            600,
            33,
            150,
            1,
            590,
            4 * block_size,
            320,
            17,
        ]
    else:  # the decodes really were split into groups padded to different widths
        assert meta.paged_decodes is None and len(meta.decode_groups) >= 3
        assert sum(g.token_idx.numel() for g in meta.decode_groups) == 9
        for g in meta.decode_groups:  # padded to its widest row, within the size limit
            rows = g.token_idx.numel()
            assert rows == 1 or g.block_ids.numel() <= DECODE_GROUP_MAX_BLOCKS
    got = backend.forward(q, k_cache, v_cache, meta, scale)
    want = _reference(q, k_cache, v_cache, tables, seqs, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decodes_of_one_length_need_no_mask():
    seqs = [(1, 64)] * 5
    q, k_cache, v_cache, tables = _step(1, 16, 2, 3, 64, seqs)
    meta = build_attention_metadata([1] * 5, [64] * 5, tables, 16, torch.device("cpu"))
    assert len(meta.decode_groups) == 1 and meta.decode_groups[0].mask is None
    got = TorchAttentionBackend().forward(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, _reference(q, k_cache, v_cache, tables, seqs, 0.125))


def test_a_block_table_too_short_for_the_context_is_refused():
    with pytest.raises(ValueError, match="2 blocks, 3 needed"):
        build_attention_metadata([1], [33], [[0, 1]], 16, torch.device("cpu"))
