"""Rotary position embedding, applied in place to the query and key heads.

DESIGN. Neox / Hugging Face "rotate half" layout, as ``executor.models.llama`` uses after
undoing the GGUF permutation: with ``h = D / 2`` and ``i < h``,

    out[i]     = x[i]     * cos[pos, i] - x[i + h] * sin[pos, i]
    out[i + h] = x[i + h] * cos[pos, i] + x[i]     * sin[pos, i]

``cos_sin_cache`` is ``[max_pos, D]`` float32, one row per position:

    [ cos(pos * f_0) ... cos(pos * f_{h-1}) | sin(pos * f_0) ... sin(pos * f_{h-1}) ]

Grid ``(T, q head blocks + k head blocks)``: a program loads its token's position
and half-row of cos and sin once, then rotates a ``[BLOCK_H, h]`` tile of q's or k's
heads. q and k may be strided views (slices of one fused qkv output): any token and
head strides, contiguous head dimension.

Numerics: cos and sin are rounded to q's dtype first, as ``executor.models.llama`` (Hugging
Face) does with ``cos.to(q.dtype)``, which is what moves bf16 results most; the rest
is float32 with one rounding at the store, where HF rounds each product and the sum
too, so bf16/fp16 results are within about one ulp of the torch path. Positions are
never read on the host: one outside ``[0, max_pos)`` is the caller's bug, as in the
torch path's indexing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import FLOAT_DTYPES, check_devices, check_tensor

_MAX_TILE = 2048  # elements of one half-tile: keeps registers modest


@triton.jit
def _rotate_tile(ptr, stride_h, head, num_heads, d, half, cos, sin):
    # ptr: this token's first element; head [BLOCK_H], d [BLOCK_D]
    mask = (head[:, None] < num_heads) & (d[None, :] < half)
    lo_ptrs = ptr + head[:, None] * stride_h + d[None, :]
    x1 = tl.load(lo_ptrs, mask=mask, other=0.0)
    x2 = tl.load(lo_ptrs + half, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    tl.store(lo_ptrs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(lo_ptrs + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_cache,
    num_q_heads,
    num_kv_heads,
    num_q_blocks,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    row = cache_ptr + pos * stride_cache
    # Rounded to q's dtype first, as HF does with cos.to(q.dtype).
    cos = tl.load(row + d, mask=d_mask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(row + half + d, mask=d_mask, other=0.0)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    if block < num_q_blocks:
        head = block * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_tile(q_ptr + t * stride_q_t, stride_q_h, head, num_q_heads, d, half, cos, sin)
    else:
        head = (block - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_tile(k_ptr + t * stride_k_t, stride_k_h, head, num_kv_heads, d, half, cos, sin)


def apply_rotary_(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor,  # [T, H_kv, D], rotated in place
    positions: torch.Tensor,  # [T] int64 or int32
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32: cos | sin
) -> None:
    """Rotate q and k in place by their tokens' positions (neox rotate-half layout)."""
    check_tensor("q", q, 3, FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("k", k, 3, FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("positions", positions, 1, (torch.int64, torch.int32))
    check_tensor("cos_sin_cache", cos_sin_cache, 2, FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, num_q_heads, head_dim = q.shape
    if k.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype}")
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} must be [T={num_tokens}, H_kv, D={head_dim}] like q")
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions has {positions.shape[0]} entries for {num_tokens} tokens")
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"head size must be even, got {head_dim}")
    if cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache rows have {cos_sin_cache.shape[1]} values, need head size {head_dim}"
        )
    check_devices(_rotary_kernel, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    num_kv_heads = k.shape[1]
    if num_tokens == 0 or num_q_heads + num_kv_heads == 0:
        return
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(
        triton.next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, _MAX_TILE // block_d)
    )
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_kv_heads,
        num_q_blocks,
        half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


def build_cos_sin_cache(
    inv_freq: torch.Tensor,  # [D/2] float32, from executor.models.llama.rope_inv_freq
    max_positions: int,
    device: torch.device | str,
) -> torch.Tensor:
    """The ``[max_positions, D]`` float32 table ``apply_rotary_`` reads: cos | sin.

    Built on the CPU in float32 exactly as ``executor.models.llama.RotaryEmbedding`` builds
    its tables, then moved, so both paths rotate by the same numbers on any device.
    """
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be [D/2], got shape {tuple(inv_freq.shape)}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    pos = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    freqs = pos[:, None] * inv_freq.detach().float().cpu()[None, :]  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


# --- float32 torch reference -----------------------------------------------------


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``apply_rotary_``: new (q, k); cos and sin rounded to q's dtype."""
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()].float()  # [T, D]
    cos = rows[:, None, :half].to(q.dtype).float()  # [T, 1, D/2]
    sin = rows[:, None, half:].to(q.dtype).float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
