"""Argument checks shared by the attention launchers (``kv_cache``, ``paged_attention``).

Every check reads shapes, strides, dtypes and devices only: nothing here looks at a
tensor's contents, so a launcher that calls these stays free of host synchronisation
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


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
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be one of {names}, got {t.dtype}")
    return t


def check_devices(kernel: object, **tensors: torch.Tensor) -> None:
    """All tensors on one device, which must be CUDA unless the kernel is interpreted."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}")
    if interpreted(kernel):
        _patch_interpreter_scalar_index()
    elif first.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {first} "
            "(set TRITON_INTERPRET=1 before importing kernels to run them on the CPU)"
        )


def check_kv_caches(
    k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate the paged pool of one layer; returns (num_blocks, block_size, H_kv, D)."""
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} differ"
        )
    num_blocks, block_size, num_kv_heads, head_size = k_cache.shape
    if block_size < 1 or num_kv_heads < 1 or head_size < 1:
        raise ValueError(f"empty KV cache dimension in shape {tuple(k_cache.shape)}")
    return num_blocks, block_size, num_kv_heads, head_size


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``out`` if given (same shape, dtype and device as ``like``), else a new tensor."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out
