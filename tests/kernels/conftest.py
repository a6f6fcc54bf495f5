"""Kernel tests run natively on a CUDA device and under Triton's interpreter elsewhere.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so the
variable is set here, before any test module imports ``kernels.*``, and only when
there is no CUDA device (on a GPU the kernels must be compiled for real).
"""

from __future__ import annotations

import os

import torch


def _patch_interpreter_scalar_index() -> None:
    """Let the interpreter use loaded scalars as loop bounds under NumPy >= 2.4.

    Triton 3.6's interpreter keeps every scalar as a 1-element array and converts it
    with ``int(array)``, which NumPy 2.4 turned into a TypeError, so any
    ``for i in range(0, n)`` with a run-time ``n`` fails. ``.item()`` is what it meant.
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


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _patch_interpreter_scalar_index()
