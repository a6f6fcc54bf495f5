"""Float32 torch reference of ``kernels.w4a16``, for tests and the CPU path.

Unpacks every code with plain shifts, dequantizes the whole weight in float32 and
multiplies with one matmul: slow, obvious, and independent of the kernel's tiling,
split-K and exponent trick. In float32, ``(code - zero) * scale`` is exact for a float16
or bfloat16 scale (a 5-bit integer times an 11-bit significand), so the dequantized
weight is the value the checkpoint means, bit for bit.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit codes per int32 word


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, N] int32 packed along K (nibble j of word i = row 8i + j) -> [K, N] int64 codes."""
    shifts = torch.arange(0, 32, 4, device=qweight.device)  # [8]
    codes = (qweight.long()[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    return codes.reshape(-1, qweight.shape[1])


def dequantize_ref(
    qweight: torch.Tensor,  # [K/8, N] int32
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor | None = None,  # [G, N] uint8; None: 8
    perm: torch.Tensor | None = None,  # [K] int32
    group_size: int = -1,
) -> torch.Tensor:  # [K, N] float32, rows in input order: y = x @ W
    codes = unpack_rows(qweight).float()
    k = codes.shape[0]
    group = k if group_size == -1 else group_size
    groups = torch.arange(k, device=qweight.device) // group
    zero = zeros.float()[groups] if zeros is not None else torch.full_like(codes, 8.0)
    w = (codes - zero) * scales.float()[groups]
    if perm is None:
        return w
    unpermuted = torch.empty_like(w)
    unpermuted[perm.long()] = w  # row i of the sorted weight multiplies x[:, perm[i]]
    return unpermuted


def w4a16_matmul_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = -1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N] float32
    y = x.float() @ dequantize_ref(qweight, scales, zeros, perm, group_size)
    return y + bias.float() if bias is not None else y
