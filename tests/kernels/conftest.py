"""Kernel tests run natively on a CUDA device and under Triton's interpreter elsewhere.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so the
variable is set here, before any test module imports ``kernels.*``, and only when
there is no CUDA device (on a GPU the kernels must be compiled for real).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
