"""The fused CPU decode kernel (``executor.cpu_attention``) on its own.

Its results against the float32 reference over mixed steps are checked in
test_torch_attention.py; here: what it writes and what it leaves, large logits, the
inputs it refuses, and that the CPU engine really takes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.executor import cpu_attention
from tests.executor.test_torch_attention import _reference, _step


def _case(seed, lens, block_size=16, h_kv=3, group=3, d=64, q_scale=1.0):
    """Decodes of the given context lengths over a shuffled pool (test_torch_attention's
    set-up), with numpy tables for the kernel and the float32 reference's output."""
    seqs = [(1, n) for n in lens]
    q, k, v, tables = _step(seed, block_size, h_kv, group, d, seqs)
    q = q * q_scale
    table_np = np.zeros((len(lens), max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):
        table_np[i, : len(t)] = t
    want = _reference(q, k, v, tables, seqs, d**-0.5)
    return q, k, v, table_np, np.array(lens, dtype=np.int32), want


def test_numba_is_installed():
    # A project dependency: without it the CPU engine silently takes the slower path.
    assert cpu_attention.available()


def test_only_the_listed_rows_are_written():
    lens = [1, 17, 300, 16, 64]
    q, k, v, tables, lens_np, want = _case(0, lens)
    # Rows 4, 0, 2 of q decode (in that order); rows 1 and 3 must stay untouched.
    rows = np.array([4, 0, 2], dtype=np.int64)
    out = torch.full_like(q, float("nan"))
    cpu_attention.paged_decode(q, k, v, rows, tables[rows], lens_np[rows], 64**-0.5, out)
    torch.testing.assert_close(out[rows], want[rows], rtol=1e-5, atol=1e-5)
    assert out[[1, 3]].isnan().all()


def test_large_logits_stay_finite_and_exact():
    # Scores in the hundreds: the online softmax must rescale, not overflow.
    lens = [2000, 33, 1]
    q, k, v, tables, lens_np, want = _case(
        1, lens, block_size=32, h_kv=1, group=8, d=128, q_scale=40
    )
    out = torch.empty_like(q)
    rows = np.arange(3, dtype=np.int64)
    cpu_attention.paged_decode(q, k, v, rows, tables, lens_np, 128**-0.5, out)
    assert out.isfinite().all()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused():
    q, k, v, tables, lens_np, _ = _case(2, [5, 9])
    rows = np.arange(2, dtype=np.int64)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.paged_decode(q.half(), k, v, rows, tables, lens_np, 0.1, out)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_attention.paged_decode(q.transpose(0, 1), k, v, rows, tables, lens_np, 0.1, out)
    q4 = q[:, :4].contiguous()  # 4 query heads over 3 KV heads
    with pytest.raises(ValueError, match="KV heads"):
        cpu_attention.paged_decode(q4, k, v, rows, tables, lens_np, 0.1, q4.clone())
    with pytest.raises(ValueError, match="one entry per decode"):
        cpu_attention.paged_decode(q, k, v, rows, tables, lens_np[:1], 0.1, out)
    with pytest.raises(ValueError, match="int32"):
        cpu_attention.paged_decode(q, k, v, rows, tables.astype(np.int64), lens_np, 0.1, out)
    # The kernel has no bounds checks, so every index is checked before it runs.
    with pytest.raises(ValueError, match="outside the batch"):
        cpu_attention.paged_decode(q, k, v, rows + 1, tables, lens_np, 0.1, out)
    with pytest.raises(ValueError, match="fit the block tables"):
        cpu_attention.paged_decode(q, k, v, rows, tables, lens_np + 16, 0.1, out)
    with pytest.raises(ValueError, match="fit the block tables"):
        cpu_attention.paged_decode(q, k, v, rows, tables, lens_np * 0, 0.1, out)
    bad = tables.copy()
    bad[1, 0] = k.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        cpu_attention.paged_decode(q, k, v, rows, bad, lens_np, 0.1, out)


def test_the_cpu_engine_decodes_through_it():
    from tessera.common.executor_config import ExecutorConfig
    from tessera.executor.model_runner import ModelRunner

    runner = ModelRunner(ExecutorConfig(model="random:smollm2-135m", device="cpu", num_kv_blocks=8))
    assert runner.attention.fused_decode
    meta = runner.attention.build_metadata([1, 1], [3, 20], [[0], [1, 2]], 16, runner.device)
    assert meta.paged_decodes is not None and not meta.decode_groups
    # A bfloat16 pool is not for the float32 kernel: decodes go through groups.
    runner = ModelRunner(
        ExecutorConfig(model="random:smollm2-135m", device="cpu", dtype="bfloat16", num_kv_blocks=8)
    )
    assert not runner.attention.fused_decode
