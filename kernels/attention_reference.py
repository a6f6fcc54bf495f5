"""Float32 torch references for ``kv_cache``, ``paged_decode`` and ``paged_prefill``, for
tests only.

They share the kernels' signatures and contracts but read lengths and block tables on
the host and loop over sequences: slow, obvious, and independent of the kernels' tiling.
Attention is computed and returned in float32 whatever the input dtypes.
"""

from __future__ import annotations

import torch

from tessera.kernels._attention_checks import FP8_MAX


def write_kv_ref(
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [N, B, H_kv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; < 0 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    h_kv, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h_kv, d)[slots] = _to_cache(k[keep], k_cache.dtype)
    v_cache.view(-1, h_kv, d)[slots] = _to_cache(v[keep], v_cache.dtype)


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:  # a float8 pool saturates at its largest value
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """The first ``num_tokens`` rows of one sequence, ``[num_tokens, H_kv, D]`` float32."""
    block_size = cache.shape[1]
    pos = torch.arange(num_tokens, device=cache.device)
    blocks = block_table.long()[pos // block_size]
    return cache[blocks, pos % block_size].float()


def _attend(
    q: torch.Tensor,  # [M, H, D] float32
    k: torch.Tensor,  # [L, H_kv, D] float32
    v: torch.Tensor,
    q_pos: torch.Tensor,  # [M]: query m sees keys 0..q_pos[m]
    scale: float,
) -> torch.Tensor:  # [M, H, D] float32
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q, k) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [M, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hml,lhd->mhd", probs, v)


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, ctx in enumerate(context_lens.tolist()):
        if ctx == 0:
            continue
        k = gather_context(k_cache, block_tables[b], ctx)
        v = gather_context(v_cache, block_tables[b], ctx)
        pos = torch.tensor([ctx - 1], device=q.device)
        out[b] = _attend(q[b : b + 1].float(), k, v, pos, scale)[0]
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, W]
    query_start_loc: torch.Tensor,  # [S+1]
    context_lens: torch.Tensor,  # [S]
    scale: float,
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        k = gather_context(k_cache, block_tables[s], ctx)
        v = gather_context(v_cache, block_tables[s], ctx)
        pos = torch.arange(ctx - (q1 - q0), ctx, device=q.device)
        out[q0:q1] = _attend(q[q0:q1].float(), k, v, pos, scale)
    return out
