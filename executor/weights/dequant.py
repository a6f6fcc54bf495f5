"""Dequantizers for the GGML tensor types Tessera reads: F32, F16, BF16, Q8_0, Q4_0, Q4_1.

Each takes a tensor's raw bytes (on any device) and returns float32 values in the
file's element order; vectorized over blocks, so they run as a few torch ops on the
device the weights go to. Block layouts (32 elements a block, little-endian):

    Q8_0  | d: f16 | q[32]: int8        |            x = d * q
    Q4_0  | d: f16 | qs[16]: 2 x uint4  |            x = d * (nibble - 8)
    Q4_1  | d: f16 | m: f16 | qs[16]    |            x = d * nibble + m

In the 4-bit types, byte j of qs holds element j in its low nibble and element
j + 16 in its high nibble.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

BLOCK_SIZE = 32  # elements per block in every quantized type read here


class UnsupportedTensorType(ValueError):
    """A GGUF tensor uses a GGML type that Tessera cannot dequantize."""


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # blocks: [n_blocks, block_bytes] uint8 -> [n_blocks, 1] float32
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [n_blocks, 16] uint8 -> [n_blocks, 32] float32, low nibbles first
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def _f32(raw: torch.Tensor) -> torch.Tensor:
    # A copy, so the result never aliases the memory-mapped file.
    return raw.view(torch.float32).clone()


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 2 + BLOCK_SIZE)  # [n_blocks, 34]
    d = _f16_field(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [n_blocks, 32]
    return (d * q).reshape(-1)


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 2 + BLOCK_SIZE // 2)  # [n_blocks, 18]
    d = _f16_field(blocks, 0)
    return (d * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(-1)


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 4 + BLOCK_SIZE // 2)  # [n_blocks, 20]
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    # Two ops, not a fused multiply-add, so values match ggml's bit for bit.
    return (d * _nibbles(blocks[:, 4:]) + m).reshape(-1)


DEQUANTIZERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.F32: _f32,
    QType.F16: _f16,
    QType.BF16: _bf16,
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
}


def dequantize(name: str, raw: torch.Tensor, qtype: int, n_elements: int) -> torch.Tensor:
    """raw: [n_bytes] uint8 of tensor `name` -> [n_elements] float32."""
    qtype = QType(qtype)
    dequantizer = DEQUANTIZERS.get(qtype)
    if dequantizer is None:
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        raise UnsupportedTensorType(
            f"tensor {name!r} has GGML type {qtype.name}, which Tessera cannot dequantize; "
            f"supported types: {supported}. Convert or requantize the file to one of them "
            "(e.g. with llama.cpp's llama-quantize)."
        )
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_elements % block_size or raw.numel() != n_elements // block_size * block_bytes:
        raise ValueError(
            f"tensor {name!r} ({qtype.name}, {n_elements} values) should take "
            f"{n_elements // block_size * block_bytes} bytes but has {raw.numel()}: "
            "the file is truncated or corrupt"
        )
    return dequantizer(raw.reshape(-1))
