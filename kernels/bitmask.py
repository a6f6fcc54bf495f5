"""Token bitmask: set to -inf the logits of tokens a row's grammar forbids.

DESIGN. ``bitmask: [R, ceil(V / 32)] int32`` holds one bit per token (bit ``v % 32`` of
word ``v // 32``; 1 allows the token), for R constrained rows; ``rows: [R] int64`` says
which rows of ``logits: [B, V]`` they are, so a batch where only some rows carry a
grammar pays for those rows only and the others are never read.

    token v of row rows[r] is allowed  <=>  (bitmask[r, v >> 5] >> (v & 31)) & 1

Grid ``(R, cdiv(V, BLOCK))``: each program loads the BLOCK / 32 words that cover its
BLOCK tokens (one gather per token, served from cache) and rewrites the forbidden
logits in place; allowed logits are left untouched (memory bound, one pass). Tokens
past the bitmask's width (a vocabulary padded beyond the tokenizer's) are forbidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import FLOAT_DTYPES, check_devices, check_tensor, num_warps_for

_MAX_BLOCK = 4096


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    stride_logits,
    stride_bitmask,
    vocab,
    num_words,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + r).to(tl.int64)
    in_vocab = cols < vocab
    word_index = cols >> 5
    in_mask = word_index < num_words
    words = tl.load(
        bitmask_ptr + r.to(tl.int64) * stride_bitmask + word_index,
        mask=in_vocab & in_mask,
        other=0,
    )
    allowed = ((words >> (cols & 31)) & 1) != 0
    ptrs = logits_ptr + row * stride_logits + cols
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(ptrs, neg_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask_(
    logits: torch.Tensor,  # [B, V], changed in place
    bitmask: torch.Tensor,  # [R, W] int32, W >= 1
    rows: torch.Tensor,  # [R] int64: the logits row of each bitmask row
) -> torch.Tensor:
    """Forbid (set to -inf) every token whose bit is 0 in its row's mask; returns logits."""
    check_tensor("logits", logits, 2, FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("bitmask", bitmask, 2, (torch.int32,), unit_last_stride=True)
    check_tensor("rows", rows, 1, (torch.int64,))
    if bitmask.shape[0] != rows.shape[0]:
        raise ValueError(
            f"bitmask has {bitmask.shape[0]} rows but rows names {rows.shape[0]}"
        )
    check_devices(_apply_bitmask_kernel, logits=logits, bitmask=bitmask, rows=rows)
    num_rows, vocab = rows.shape[0], logits.shape[1]
    if num_rows == 0 or vocab == 0:
        return logits
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK)
    grid = (num_rows, triton.cdiv(vocab, block))
    _apply_bitmask_kernel[grid](
        logits,
        bitmask,
        rows.contiguous(),
        logits.stride(0),
        bitmask.stride(0),
        vocab,
        bitmask.shape[1],
        BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab] bool (True: allowed); tokens past 32 * W are forbidden."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # [R, 32 W]
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    pad = torch.zeros(allowed.shape[0], vocab - allowed.shape[1], dtype=torch.bool,
                      device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_token_bitmask_ref_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Reference of ``apply_token_bitmask_`` (and the CPU path): plain torch, in place."""
    if rows.numel() == 0:
        return logits
    allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, V]
    picked = logits.index_select(0, rows)
    picked.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, picked)
    return logits
