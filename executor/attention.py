"""Paged attention behind one small interface, so a kernel backend can replace it.

The KV pool of one layer is a pair of tensors ``[num_blocks, block_size, H_kv, D]``.
A token's *slot* is ``block_id * block_size + offset``; a sequence's tokens live in
the blocks of its block table, in order:

    block_table = [7, 2, 9]          block_size = 4
    position p  -> block_table[p // 4] * 4 + p % 4
    p = 0..3 -> slots 28..31, p = 4..7 -> slots 8..11, p = 8.. -> slots 36..

``TorchAttentionBackend`` is the plain-torch reference used on the CPU: it gathers
each sequence's context through its block table and calls
``scaled_dot_product_attention``. Decodes (one query token) are batched into one
padded call; prefill chunks run one sequence at a time with a causal mask offset by
the number of tokens already in the cache (so chunked prefill and, later, cached
prefixes need nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout of the flattened batch, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    # Decode rows (one query token each), batched: indices into the flat batch.
    decode_token_idx: torch.Tensor  # [Bd] int64
    decode_slots: torch.Tensor  # [Bd, Lmax] int64: context slots, padded with 0
    decode_mask: torch.Tensor  # [Bd, 1, 1, Lmax] bool: True where a key is real
    # Prefill rows: (first query index in the flat batch, query length, context slots)
    prefills: list[tuple[int, int, torch.Tensor]]
    num_tokens: int


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Lay out one step. ``context_lens[i]`` counts the tokens of sequence i once this
    step's tokens are written (cached prefix + this step's queries)."""
    slot_chunks: list[torch.Tensor] = []
    decode_rows: list[int] = []
    decode_ctx: list[torch.Tensor] = []
    prefills: list[tuple[int, int, torch.Tensor]] = []
    start = 0
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
        slots = _context_slots(table, ctx_len, block_size)  # [ctx_len]
        slot_chunks.append(slots[ctx_len - q_len :])
        if q_len == 1:
            decode_rows.append(start)
            decode_ctx.append(slots)
        else:
            prefills.append((start, q_len, slots.to(device)))
        start += q_len
    num_decodes = len(decode_rows)
    max_len = max((len(s) for s in decode_ctx), default=0)
    decode_slots = torch.zeros(num_decodes, max_len, dtype=torch.int64)
    decode_mask = torch.zeros(num_decodes, 1, 1, max_len, dtype=torch.bool)
    for i, slots in enumerate(decode_ctx):
        decode_slots[i, : len(slots)] = slots
        decode_mask[i, 0, 0, : len(slots)] = True
    slot_mapping = torch.cat(slot_chunks) if slot_chunks else torch.zeros(0, dtype=torch.int64)
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        decode_token_idx=torch.tensor(decode_rows, dtype=torch.int64, device=device),
        decode_slots=decode_slots.to(device),
        decode_mask=decode_mask.to(device),
        prefills=prefills,
        num_tokens=start,
    )


def _context_slots(block_table: list[int], ctx_len: int, block_size: int) -> torch.Tensor:
    num_blocks = -(-ctx_len // block_size)
    if num_blocks > len(block_table):
        raise ValueError(
            f"block table has {len(block_table)} blocks, {num_blocks} needed for "
            f"{ctx_len} tokens at block size {block_size}"
        )
    blocks = torch.tensor(block_table[:num_blocks], dtype=torch.int64)
    offsets = torch.arange(block_size, dtype=torch.int64)
    return (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:ctx_len]


class TorchAttentionBackend:
    """Reference paged attention in plain torch (CPU, or any device for testing)."""

    @staticmethod
    def build_metadata(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        return build_attention_metadata(query_lens, context_lens, block_tables, block_size, device)

    def write_kv(
        self,
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        k_cache: torch.Tensor,  # [N, B, H_kv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        h_kv, d = k.shape[1], k.shape[2]
        k_cache.view(-1, h_kv, d).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, h_kv, d).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # [N, B, H_kv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        num_heads, d = q.shape[1], q.shape[2]
        h_kv = k_cache.shape[2]
        k_flat = k_cache.view(-1, h_kv, d)
        v_flat = v_cache.view(-1, h_kv, d)
        gqa = num_heads != h_kv
        out = torch.empty_like(q)
        if meta.decode_token_idx.numel():
            qd = q[meta.decode_token_idx].unsqueeze(2)  # [Bd, H, 1, D]
            kd = k_flat[meta.decode_slots].transpose(1, 2)  # [Bd, H_kv, L, D]
            vd = v_flat[meta.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd,
                kd.to(q.dtype),
                vd.to(q.dtype),
                attn_mask=meta.decode_mask,
                scale=scale,
                enable_gqa=gqa,
            )  # [Bd, H, 1, D]
            out[meta.decode_token_idx] = od.squeeze(2)
        for start, q_len, slots in meta.prefills:
            ctx_len = slots.numel()
            qp = q[start : start + q_len].transpose(0, 1)  # [H, q, D]
            kp = k_flat[slots].transpose(0, 1).to(q.dtype)  # [H_kv, ctx, D]
            vp = v_flat[slots].transpose(0, 1).to(q.dtype)
            if ctx_len == q_len:
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa
                )
            else:
                # Query i sits at absolute position ctx_len - q_len + i.
                q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=gqa
                )
            out[start : start + q_len] = op.transpose(0, 1)
        return out
