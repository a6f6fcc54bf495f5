"""RMSNorm, alone and fused with the residual add of a Llama decoder layer.

DESIGN. One program normalises one row of ``x: [T, hidden]``, holding the whole row
in registers (``BLOCK = next_power_of_2(hidden)``, masked), so each element is read
once and written once: these kernels are memory bound. Rows may have any stride;
the hidden dimension must be contiguous.

Numerics follow Hugging Face's ``LlamaRMSNorm`` (and ``executor.models.llama.rms_norm``)
cast for cast, so the fused path and the torch path agree to the last bit except
where float32 sums round differently:

    residual = dtype(residual + x)                 # fused only: HF's ``h = h + x``
    n        = dtype(r * rsqrt(mean(r * r) + eps)) # r = float32(residual), in float32
    out      = dtype(weight * n)                   # one multiply, rounded once

``dtype`` is the input's dtype. HF returns float32 when the weight is float32 and the
input is not; here the output always has the input's dtype.
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

MAX_HIDDEN = 65536  # one row lives in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    ADD_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        res_ptrs = residual_ptr + row * stride_residual + cols
        r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_ptr.dtype.element_ty)  # HF rounds h + x to dtype
        tl.store(res_ptrs, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    normed = x * tl.rsqrt(mean_square + eps)
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)  # HF: .to(input_dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask
    )


def _check_common(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    check_tensor("x", x, 2, FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("weight", weight, 1, FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, hidden = x.shape
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements for hidden size {hidden}")
    if hidden < 1 or hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size must be in [1, {MAX_HIDDEN}], got {hidden}")
    return num_tokens, hidden


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [T, hidden], x's dtype; may be x itself
) -> torch.Tensor:
    """``weight * x / rms(x)`` per row, computed in float32, returned in x's dtype."""
    num_tokens, hidden = _check_common(x, weight)
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    check_out("out", out, (num_tokens, hidden), x)
    check_devices(_rms_norm_kernel, x=x, weight=weight, out=out)
    if num_tokens == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        x,
        weight,
        out,
        x.stride(0),
        0,
        out.stride(0),
        hidden,
        eps,
        ADD_RESIDUAL=False,
        BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, hidden]: in, the layer's output; out, the next norm's output
    residual: torch.Tensor,  # [T, hidden], x's dtype: the residual stream, updated
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> None:
    """In place: ``residual += x``, then ``x = rms_norm(residual) * weight``."""
    num_tokens, hidden = _check_common(x, weight)
    check_out("residual", residual, (num_tokens, hidden), x)
    check_devices(_rms_norm_kernel, x=x, residual=residual, weight=weight)
    if num_tokens == 0:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual,
        weight,
        x,
        x.stride(0),
        residual.stride(0),
        x.stride(0),
        hidden,
        eps,
        ADD_RESIDUAL=True,
        BLOCK=block,
        num_warps=num_warps_for(block),
    )


# --- float32 torch references ----------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of ``rms_norm``: float32 math, rounded to x's dtype where HF rounds."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fused_add_rms_norm``; returns (new x, new residual), inputs untouched."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
