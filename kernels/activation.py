"""SiLU-and-multiply: the gated activation of a Llama MLP.

DESIGN. ``x: [T, 2I]`` is the output of the fused gate/up projection, gate in the
first half of each row and up in the second; ``out[t, i] = silu(gate) * up``.
Grid ``(T, cdiv(I, BLOCK))``: each program reads a BLOCK of gate and of up and
writes a BLOCK of out, so every element moves once (memory bound). Rows may have
any stride; the last dimension must be contiguous.

Numerics follow ``F.silu(gate) * up`` in the input dtype, as ``executor.models.llama``
computes it: silu in float32 rounded to the dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import (
    FLOAT_DTYPES,
    check_devices,
    check_out,
    check_tensor,
    num_warps_for,
)

_MAX_BLOCK = 2048


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu rounds here
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2I]: gate | up
    *,
    out: torch.Tensor | None = None,  # [T, I], x's dtype
) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]``, returned in x's dtype."""
    check_tensor("x", x, 2, FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x rows must hold gate and up halves of equal width, got {width}")
    inter = width // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    check_out("out", out, (num_tokens, inter), x)
    check_devices(_silu_and_mul_kernel, x=x, out=out)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), _MAX_BLOCK)
    grid = (num_tokens, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        x,
        out,
        x.stride(0),
        out.stride(0),
        inter,
        BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference of ``silu_and_mul``: float32 math, rounded where ``F.silu(g) * u`` rounds."""
    gate, up = x.float().chunk(2, dim=-1)
    silu = (gate / (1.0 + torch.exp(-gate))).to(x.dtype).float()
    return (silu * up).to(x.dtype)
