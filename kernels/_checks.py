"""Argument checks shared by every kernel launcher (``_attention_checks`` adds the pool's).

Every check reads shapes, strides, dtypes and devices only, never a tensor's
contents, so a launcher built on them does no host synchronisation and can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _patch_interpreter_scalar_index() -> None:
    """Let the interpreter use loaded scalars as loop bounds under NumPy >= 2.4.

    Triton 3.6's interpreter keeps every scalar as a 1-element array and converts it
    with ``int(array)``, which NumPy 2.4 made a TypeError, so a ``range(start, end)``
    with run-time bounds fails. ``.item()`` is what it meant. Applied once, on the
    first interpreted launch, and only then.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_tessera_patched", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._tessera_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def check_tensor(
    name: str,
    t: object,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    *,
    unit_last_stride: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be one of {names}, got {t.dtype}")
    if unit_last_stride and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a unit stride in its last dimension, got strides {t.stride()}"
        )
    return t


def check_devices(kernel: object, **tensors: torch.Tensor) -> None:
    """All tensors on one device, which must be CUDA unless the kernel is interpreted."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    if interpreted(kernel):
        _patch_interpreter_scalar_index()
    elif first.device.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {first.device} "
            "(set TRITON_INTERPRET=1 before importing kernels to run them on the CPU)"
        )


def check_out(name: str, out: object, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """``out`` must have ``shape``, ``like``'s dtype and device, and a unit last stride."""
    check_tensor(name, out, len(shape), (like.dtype,), unit_last_stride=True)
    assert isinstance(out, torch.Tensor)
    if tuple(out.shape) != shape or out.device != like.device:
        raise ValueError(
            f"{name} must be {shape} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def num_warps_for(num_elements: int) -> int:
    """Warps for a program that streams ``num_elements`` values: ~8-16 values a thread."""
    return max(1, min(16, num_elements // 256))
