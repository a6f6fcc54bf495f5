"""benchmarks/roofline.py: the rooflines printed beside measured throughput. Expected
values are worked out by hand from the definitions in the module's docstring."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_spec = importlib.util.spec_from_file_location(
    "roofline", Path(__file__).resolve().parents[2] / "benchmarks" / "roofline.py"
)
roofline = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("roofline", roofline)  # dataclasses look their module up
_spec.loader.exec_module(roofline)

TINY = SimpleNamespace(
    hidden_size=4,
    head_dim=2,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=8,
    vocab_size=10,
)

# Decode steps bound by 100 bytes of weights; a token's linears cost 10 FLOPs.
WEIGHT_BOUND = roofline.Shape(
    weight_bytes=100, kv_bytes_per_token=0, linear_flops_per_token=10, attention_flops_per_pair=0
)


def test_shape_counts_every_linear_and_the_lm_head():
    s = roofline.shape_of(TINY, weight_bytes=7, kv_bytes_per_token=3)
    # q 4x4, k and v 4x2 each, o 4x4, gate/up/down 3 x 4x8, lm head 4x10: 184 MACs
    assert s.linear_flops_per_token == 2 * 184
    # QK^T and PV: 2 heads x head size 2 MACs each, one layer
    assert s.attention_flops_per_pair == 2 * 2 * 2 * 2
    half = roofline.shape_of(TINY, 7, 3, tp=2)
    assert half.linear_flops_per_token == 184 and half.attention_flops_per_pair == 8


def test_a_decode_step_is_bound_by_bytes_or_by_flops_whichever_is_longer():
    s = roofline.Shape(
        weight_bytes=100,
        kv_bytes_per_token=1,
        linear_flops_per_token=10,
        attention_flops_per_pair=1,
    )
    # bytes: (100 + 20) / 1 = 120 s; flops: (4 x 10 + 20) / 1000 = 0.06 s
    assert roofline.decode_step_s(s, 4, 20, bw=1.0, rate=1000.0) == pytest.approx(120.0)
    # flops: (40 + 20) / 0.1 = 600 s beats 120 s of bytes in both parts
    assert roofline.decode_step_s(s, 4, 20, bw=1.0, rate=0.1) == pytest.approx(600.0)


def test_linears_and_attention_are_bound_each_by_its_own_limit():
    # Linears: 100 bytes but 4 x 50 = 200 FLOPs; attention: 20 bytes and no FLOPs. At one
    # byte and one FLOP a second they take 200 + 20 s, not max(120, 200) s.
    s = roofline.Shape(
        weight_bytes=100,
        kv_bytes_per_token=1,
        linear_flops_per_token=50,
        attention_flops_per_pair=0,
    )
    assert roofline.decode_step_s(s, 4, 20, bw=1.0, rate=1.0) == pytest.approx(220.0)


def test_prefill_counts_causal_pairs():
    s = roofline.Shape(0, 0, linear_flops_per_token=10, attention_flops_per_pair=1)
    # 3 tokens: 30 linear FLOPs and 1 + 2 + 3 = 6 pairs
    assert roofline.prefill_s(s, 3, rate=2.0) == pytest.approx(18.0)


def test_workload_decodes_after_prefill_and_batches_what_the_pool_holds():
    mem = roofline.Shape(
        weight_bytes=100, kv_bytes_per_token=1, linear_flops_per_token=0, attention_flops_per_pair=0
    )
    # One request, 3 in and 3 out: prefill makes the first token (free here), then two
    # steps over 4 and 5 cached tokens.
    assert roofline.workload_s(mem, [(3, 3)], 8, 1000, 1.0, 1.0) == pytest.approx(104 + 105)
    # Two requests of 1 in, 2 out: together one step over 2 + 2 tokens...
    both = roofline.workload_s(mem, [(1, 2), (1, 2)], 8, 6, 1.0, 1.0)
    assert both == pytest.approx(104)
    # ...but a pool of 3 tokens holds one at a time, and the batch limit does the same.
    assert roofline.workload_s(mem, [(1, 2), (1, 2)], 8, 3, 1.0, 1.0) == pytest.approx(2 * 102)
    assert roofline.workload_s(mem, [(1, 2), (1, 2)], 1, 100, 1.0, 1.0) == pytest.approx(2 * 102)


def test_workload_steps_shrink_as_requests_finish():
    mem = roofline.Shape(
        weight_bytes=10, kv_bytes_per_token=1, linear_flops_per_token=0, attention_flops_per_pair=0
    )
    # (1 in, 2 out) and (1 in, 4 out): steps over 2+2, then 3 alone, then 4 alone.
    got = roofline.workload_s(mem, [(1, 2), (1, 4)], 8, 100, 1.0, 1.0)
    assert got == pytest.approx((10 + 4) + (10 + 3) + (10 + 4))
    # A request of one output token is its prefill alone.
    assert roofline.workload_s(mem, [(5, 1)], 8, 100, 1.0, 1.0) == 0.0


def test_prefill_fills_the_compute_that_weight_bound_decode_steps_leave_idle():
    s = WEIGHT_BOUND
    # (2 in, 3 out) alone at 1 byte/s and 1 FLOP/s: two decode steps of 100 s (reads),
    # each leaving 100 - 10 = 90 s of compute idle; prefill needs 2 x 10 = 20 s: free.
    assert roofline.workload_s(s, [(2, 3)], 8, 100, 1.0, 1.0) == pytest.approx(200.0)
    # A 30-token prompt needs 300 s of compute: 180 s fit in the steps, 120 s add.
    assert roofline.workload_s(s, [(30, 3)], 8, 100, 1.0, 1.0) == pytest.approx(320.0)


def test_steps_before_a_request_is_admitted_do_not_absorb_its_prefill():
    s = WEIGHT_BOUND
    # One sequence at a time: (1 in, 3 out) then (30 in, 2 out). The first one's two
    # steps leave 180 s idle but the second prompt (300 s) is not admitted yet; its own
    # step leaves 90 s: 300 - 90 = 210 s add to 3 x 100 s of steps (+ 10 s of the first
    # prompt, absorbed).
    got = roofline.workload_s(s, [(1, 3), (30, 2)], 1, 100, 1.0, 1.0)
    assert got == pytest.approx(300.0 + 210.0)


def test_prefill_left_over_is_not_absorbed_by_later_requests_steps():
    s = WEIGHT_BOUND
    # (30 in, 2 out) then (1 in, 3 out), one at a time: the first prompt's 300 s meet one
    # step's 90 s idle (210 s add) and must finish before it decodes, so the second
    # request's idle steps cannot take the rest.
    got = roofline.workload_s(s, [(30, 2), (1, 3)], 1, 100, 1.0, 1.0)
    assert got == pytest.approx(300.0 + 210.0)
