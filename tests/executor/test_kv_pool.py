"""The KV pool's allocation (`model_runner.zeroed_pool`): what torch.zeros would give,
mapped lazily on the CPU so that a restart does not write 2 GiB of zeros."""

from __future__ import annotations

import gc

import pytest
import torch

from tessera.executor.model_runner import zeroed_pool

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_pool_is_zeros_and_outlives_its_mapping(dtype: torch.dtype):
    shape = (5, 16, 3, 64)  # [blocks, block_size, kv_heads, head_dim]
    k, v = zeroed_pool(shape, dtype, CPU), zeroed_pool(shape, dtype, CPU)
    gc.collect()  # only the tensors hold the maps now
    assert (k.shape, k.dtype, k.device.type, k.is_contiguous()) == (shape, dtype, "cpu", True)
    assert torch.equal(k, torch.zeros(shape, dtype=dtype))
    k.fill_(1.5)
    k[-1, -1, -1, -1] = 2.0  # the last byte is writable
    assert torch.equal(v, torch.zeros(shape, dtype=dtype))  # two pools never share memory
    assert k.float().sum().item() == 1.5 * (k.numel() - 1) + 2.0


def test_pool_numpy_view_is_what_the_numba_kernel_reads():
    pool = zeroed_pool((2, 16, 1, 8), torch.float32, CPU)
    pool.numpy()[1, 3, 0, 5] = 4.0  # cpu_attention passes .numpy() views
    assert pool[1, 3, 0, 5].item() == 4.0 and pool.sum().item() == 4.0
