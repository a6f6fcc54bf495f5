"""Paged attention behind one small interface, so a kernel backend can replace it.

The KV pool of one layer is a pair of tensors ``[num_blocks, block_size, H_kv, D]``.
A token's *slot* is ``block_id * block_size + offset``; a sequence's tokens live in
the blocks of its block table, in order:

    block_table = [7, 2, 9]          block_size = 4
    position p  -> block_table[p // 4] * 4 + p % 4
    p = 0..3 -> slots 28..31, p = 4..7 -> slots 8..11, p = 8.. -> slots 36..

``TorchAttentionBackend`` is the plain-torch path used on the CPU. It copies each
sequence's context out of the pool a whole block at a time (``index_select`` over the
block dimension: one memcpy of ``block_size * H_kv * D`` values per block; indexing
slot by slot with a 2-D index was ~8x slower and took most of a CPU decode step) and
calls ``scaled_dot_product_attention``:

- Decodes (one query token each) run batched. Grouped-query attention needs no
  copies of K/V: the G query heads that share a KV head go in as G "query rows" of
  that head (``q.view(n, H_kv, G, D)``), all attending to the same keys. Rows are
  padded to the longest context in their call and masked, so decodes are sorted by
  context length and split into groups whose padding stays under
  ``DECODE_GROUP_SLACK`` and whose size stays under ``DECODE_GROUP_MAX_BLOCKS``.
- With ``fused_decode`` (CPU, float32 pools, numba installed), decodes skip the
  copy: ``executor.cpu_attention`` reads the blocks in place, every decode in one call
  (no groups, no padding).
- Prefill chunks run one sequence at a time with a causal mask offset by the number
  of tokens already in the cache (so chunked prefill and cached prefixes need
  nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tessera.executor import cpu_attention

# A decode group may hold at most this many times the key blocks its rows really have,
# and at most this many blocks in all (a group's K/V copy, 3 MiB for SmolLM2, then stays
# in cache for the attention call that reads it). Tuned on the 2-core VM at 8 to 64
# sequences of 150 to 768 tokens: one padded call was 1.5-2.7x slower at 32-64.
DECODE_GROUP_SLACK = 1.1
DECODE_GROUP_MAX_BLOCKS = 128


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows attended in one call, padded to the longest context among them."""

    token_idx: torch.Tensor  # [n] int64: rows of the flat batch
    block_ids: torch.Tensor  # [n * max_blocks] int64: block tables, padded with block 0
    mask: torch.Tensor | None  # [n, 1, 1, max_blocks * block_size] bool; None: all real


@dataclass(slots=True)
class PagedDecodes:
    """Every decode of a step, for the fused CPU kernel (host arrays)."""

    rows: np.ndarray  # [n] int64: rows of the flat batch
    tables: np.ndarray  # [n, max_blocks] int32: block tables, padded with block 0
    lens: np.ndarray  # [n] int32: context lengths


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first query row in the flat batch
    query_len: int
    context_len: int  # cached prefix + this chunk
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64
    # [query_len, context_len] bool, query i seeing keys up to its absolute position
    # context_len - query_len + i; None without a cached prefix (plain causal).
    mask: torch.Tensor | None


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout of the flattened batch, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    num_tokens: int
    paged_decodes: PagedDecodes | None = None  # instead of decode_groups, when fused


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    fused_decode: bool = False,
) -> AttentionMetadata:
    """Lay out one step. ``context_lens[i]`` counts the tokens of sequence i once this
    step's tokens are written (cached prefix + this step's queries). With
    ``fused_decode`` the decodes go in ``paged_decodes`` instead of groups."""
    slots: list[int] = []
    decodes: list[tuple[int, int, list[int]]] = []  # (row, context length, blocks)
    prefills: list[PrefillChunk] = []
    start = 0
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
        num_blocks = -(-ctx_len // block_size)
        if num_blocks > len(table):
            raise ValueError(
                f"block table has {len(table)} blocks, {num_blocks} needed for "
                f"{ctx_len} tokens at block size {block_size}"
            )
        blocks = table[:num_blocks]
        slots.extend(
            blocks[p // block_size] * block_size + p % block_size
            for p in range(ctx_len - q_len, ctx_len)
        )
        if q_len == 1:
            decodes.append((start, ctx_len, blocks))
        else:
            ids = torch.tensor(blocks, dtype=torch.int64, device=device)
            prefills.append(
                PrefillChunk(start, q_len, ctx_len, ids, _prefix_mask(q_len, ctx_len, device))
            )
        start += q_len
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    if fused_decode:
        return AttentionMetadata(slot_mapping, [], prefills, start, _paged_decodes(decodes))
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        decode_groups=[_decode_group(g, block_size, device) for g in _group_by_length(decodes)],
        prefills=prefills,
        num_tokens=start,
    )


def _paged_decodes(decodes: list[tuple[int, int, list[int]]]) -> PagedDecodes | None:
    if not decodes:
        return None
    width = max(len(blocks) for _, _, blocks in decodes)
    return PagedDecodes(
        rows=np.array([row for row, _, _ in decodes], dtype=np.int64),
        tables=np.array(_padded_tables(decodes, width), dtype=np.int32),
        lens=np.array([ctx_len for _, ctx_len, _ in decodes], dtype=np.int32),
    )


def _padded_tables(decodes: list[tuple[int, int, list[int]]], width: int) -> list[list[int]]:
    """The decodes' block tables as rows of ``width`` ids, padded with block 0 (never
    read: the padding lies past each row's context length)."""
    return [blocks + [0] * (width - len(blocks)) for _, _, blocks in decodes]


def _prefix_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
    if ctx_len == q_len:
        return None
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
    return torch.arange(ctx_len, device=device)[None, :] <= q_pos[:, None]


def _group_by_length(decodes: list[tuple[int, int, list[int]]]):
    """Split decodes, longest first, into groups within the two limits above."""
    group: list[tuple[int, int, list[int]]] = []
    real_blocks = 0
    for entry in sorted(decodes, key=lambda e: -len(e[2])):
        n = len(entry[2])
        padded = (len(group) + 1) * len(group[0][2]) if group else n
        if group and (
            padded > DECODE_GROUP_SLACK * (real_blocks + n) or padded > DECODE_GROUP_MAX_BLOCKS
        ):
            yield group
            group, real_blocks = [], 0
        group.append(entry)
        real_blocks += n
    if group:
        yield group


def _decode_group(
    group: list[tuple[int, int, list[int]]], block_size: int, device: torch.device
) -> DecodeGroup:
    width = len(group[0][2])  # the longest first
    block_ids = torch.tensor(_padded_tables(group, width), dtype=torch.int64)
    ctx_lens = torch.tensor([ctx_len for _, ctx_len, _ in group], dtype=torch.int64)
    mask = None
    if int(ctx_lens.min()) < width * block_size:
        mask = torch.arange(width * block_size)[None, :] < ctx_lens[:, None]
        mask = mask[:, None, None, :].to(device)
    return DecodeGroup(
        token_idx=torch.tensor([row for row, _, _ in group], dtype=torch.int64, device=device),
        block_ids=block_ids.view(-1).to(device),
        mask=mask,
    )


class TorchAttentionBackend:
    """Paged attention in plain torch (CPU, or any device for testing).

    ``fused_decode``: decodes through ``executor.cpu_attention`` (CPU float32 pools
    only; the caller checks ``cpu_attention.available()``)."""

    def __init__(self, fused_decode: bool = False) -> None:
        self.fused_decode = fused_decode

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        return build_attention_metadata(
            query_lens, context_lens, block_tables, block_size, device, self.fused_decode
        )

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
        group_size = num_heads // h_kv
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.paged_decodes is not None:
            dec = meta.paged_decodes
            q = q.contiguous()
            cpu_attention.paged_decode(
                q, k_cache, v_cache, dec.rows, dec.tables, dec.lens, scale, out
            )
        for group in meta.decode_groups:
            n = group.token_idx.numel()
            qd = q.index_select(0, group.token_idx).view(n, h_kv, group_size, d)
            od = F.scaled_dot_product_attention(
                qd,
                _gather(k_cache, group.block_ids, n, q.dtype),
                _gather(v_cache, group.block_ids, n, q.dtype),
                attn_mask=group.mask,
                scale=scale,
            )  # [n, H_kv, G, D]
            out.index_copy_(0, group.token_idx, od.reshape(n, num_heads, d))
        for chunk in meta.prefills:
            start, q_len, ctx_len = chunk.start, chunk.query_len, chunk.context_len
            # 4-D throughout: torch's CPU flash kernel takes only 4-D inputs (3-D ones
            # fall back to its math path, ~10x slower).
            qp = q[start : start + q_len].transpose(0, 1)[None]  # [1, H, q, D]
            kp = _gather(k_cache, chunk.block_ids, 1, q.dtype)[:, :, :ctx_len]  # [1, H_kv, ctx, D]
            vp = _gather(v_cache, chunk.block_ids, 1, q.dtype)[:, :, :ctx_len]
            op = F.scaled_dot_product_attention(
                qp,
                kp,
                vp,
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=scale,
                enable_gqa=group_size != 1,
            )
            out[start : start + q_len] = op[0].transpose(0, 1)
        return out


def _gather(
    cache: torch.Tensor, block_ids: torch.Tensor, rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks of the pool, [rows * blocks, B, H_kv, D] -> [rows, H_kv, blocks * B, D].

    On a 2-D view: index_select over the 4-D tensor takes a generic path ~3x slower."""
    h_kv, d = cache.shape[2], cache.shape[3]
    ctx = cache.view(cache.shape[0], -1).index_select(0, block_ids).view(rows, -1, h_kv, d)
    return ctx.transpose(1, 2).to(dtype)
