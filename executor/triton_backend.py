"""Paged attention with the Triton kernels of ``kernels/``: the CUDA path.

Same pool layout and the same two calls as ``TorchAttentionBackend`` (``write_kv``,
``forward``), but the step is described by tensors only, so a decode step can be
captured in a CUDA graph and replayed with new contents:

    slot_mapping     [T] int64     where each new token's K/V goes; -1 = padding row
    block_tables     [S, W] int32  each sequence's blocks (W fixed for a graph)
    context_lens     [S] int32     tokens in the cache once this step is written; 0 = pad
    query_start_loc  [S+1] int32   where each sequence's queries start in the flat batch

A step where every sequence has one query token runs the split-KV decode kernel;
any other step runs the variable-length prefill kernel, which reads each sequence's
cached prefix through its block table (chunked prefill and decodes mixed in need
nothing else).

Host-side layout is numpy over whole arrays (no per-token Python), then one copy of
each array to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tessera.executor.transfer import to_device


@dataclass(slots=True)
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, W] int32
    context_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S+1] int32
    max_query_len: int
    num_tokens: int
    decode_only: bool
    num_splits: int | None = None  # decode: fixed for a captured graph, else the kernel's


def layout_step(
    query_lens: np.ndarray,  # [S] int
    context_lens: np.ndarray,  # [S] int: cached + this step's tokens
    block_tables: np.ndarray,  # [S, W] int32
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions [T], slot_mapping [T], query_start_loc [S+1]) of one step, vectorised."""
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    total = int(qsl[-1])
    seq = np.repeat(np.arange(len(query_lens)), query_lens)  # [T] row of each token
    # Token j of sequence s sits at position context_lens[s] - query_lens[s] + j.
    first = (context_lens - query_lens)[seq]
    positions = first + (np.arange(total) - qsl[:-1][seq])
    blocks = block_tables[seq, positions // block_size].astype(np.int64)
    slots = blocks * block_size + positions % block_size
    return positions.astype(np.int64), slots, qsl


class TritonAttentionBackend:
    """Paged attention through ``kernels.paged_decode`` and ``kernels.paged_prefill`` (CUDA,
    or the interpreter)."""

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> TritonAttentionMetadata:
        """The same arguments as ``executor.attention.build_attention_metadata``."""
        width = max(-(-c // block_size) for c in context_lens)
        table = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, (blocks, ctx) in enumerate(zip(block_tables, context_lens, strict=True)):
            n = -(-ctx // block_size)
            if n > len(blocks):
                raise ValueError(
                    f"block table has {len(blocks)} blocks, {n} needed for {ctx} tokens "
                    f"at block size {block_size}"
                )
            table[i, :n] = blocks[:n]
        q = np.asarray(query_lens, dtype=np.int64)
        c = np.asarray(context_lens, dtype=np.int64)
        _, slots, qsl = layout_step(q, c, table, block_size)
        return self.metadata_from_arrays(q, c, table, slots, qsl, device)

    @staticmethod
    def metadata_from_arrays(
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        slot_mapping: np.ndarray,
        query_start_loc: np.ndarray,
        device: torch.device,
    ) -> TritonAttentionMetadata:
        max_q = int(query_lens.max()) if len(query_lens) else 0
        return TritonAttentionMetadata(
            slot_mapping=_to(slot_mapping, torch.int64, device),
            block_tables=_to(block_tables, torch.int32, device),
            context_lens=_to(context_lens, torch.int32, device),
            query_start_loc=_to(query_start_loc, torch.int32, device),
            max_query_len=max_q,
            num_tokens=int(query_start_loc[-1]),
            decode_only=max_q == 1,
        )

    def write_kv(
        self,
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [N, B, H_kv, D]
        v_cache: torch.Tensor,
        meta: TritonAttentionMetadata,
    ) -> None:
        from tessera.kernels.kv_cache import write_kv

        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        from tessera.kernels.paged_decode import paged_decode_attention
        from tessera.kernels.paged_prefill import paged_prefill_attention

        if meta.decode_only:
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens,
                scale,
                num_splits=meta.num_splits,
            )
        return paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            scale,
            max_query_len=meta.max_query_len,
        )


def _to(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(array, device, dtype)
