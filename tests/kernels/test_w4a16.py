"""The W4A16 GEMMs (kernels/w4a16.py, kernels/_w4a16_tc.py) against their float32 reference
(kernels/w4a16_reference.py), and the launcher's choice between a fused kernel and
dequantize + mm.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (conftest.py), so
shapes stay tiny. The weights are random codes, scales and zero points in the kernel's
own layout; the GPTQ / AWQ checkpoint formats are tests/executor/test_quantized.py's.
float32 activations are compared to ~1e-5 (the dequantized weight is exact; only the
summation order differs); fp16 / bf16 within a few ulps of the largest output, since
the kernel rounds the weight tile to the activation dtype before its dot product.
"""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import w4a16
from tessera.kernels.w4a16 import W4Config, dequantize_w4, uses_dequant_mm, w4a16_matmul
from tessera.kernels.w4a16_reference import dequantize_ref, w4a16_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _weight(k: int, n: int, group_size: int, zeros: bool, act_order: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = k // (k if group_size == -1 else group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int64)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
    zero = torch.randint(0, 17, (groups, n), generator=g).to(torch.uint8) if zeros else None
    perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
    tensors = (qweight.to(torch.int32), scales, zero, perm)
    return tuple(t.to(DEVICE) if t is not None else None for t in tensors)


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and not torch.isnan(y).any()
    err = (y.float() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item()), err


# K = 200 and 296 are not multiples of any tile; N = 40, 72, 50 are not multiples of 64.
SHAPES = [  # (K, N, group_size, zero points, act-order)
    (96, 40, 32, True, False),
    (256, 72, 64, False, True),
    (256, 50, 128, True, True),
    (200, 72, -1, True, False),
    (296, 24, -1, False, True),
]


@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}-n{}-g{}-z{:d}-p{:d}".format(*s))
def test_matches_reference_float32(m, shape):
    k, n, group_size, zeros, act_order = shape
    qweight, scales, zero, perm = _weight(k, n, group_size, zeros, act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    out = torch.full((m, n), float("nan"), device=DEVICE)  # every element must be written
    y = w4a16_matmul(x, qweight, scales, zero, perm, group_size, out=out, dequant_min_m=None)
    assert y is out
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, group_size), torch.float32)


def _tc(m: int, block_k: int = 128, **change) -> W4Config:
    """Tensor-core tiles for m rows: 16 rows a tile up to 16 rows, else 64 (300 rows: 5)."""
    return W4Config(16 if m <= 16 else 64, 32, block_k, kernel="tc", **change)


@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}-n{}-g{}-z{:d}-p{:d}".format(*s))
def test_tc_matches_reference_float32(m, shape):
    """One dot of depth 128 per tile: groups of 32 and 64 are 4 and 2 scale rows per tile,
    128 and -1 one; K = 200 and 296 end in a partial tile, N in a partial column tile."""
    k, n, group_size, zeros, act_order = shape
    qweight, scales, zero, perm = _weight(k, n, group_size, zeros, act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zero, perm, group_size, out=out, config=_tc(m))
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, group_size), torch.float32)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("m", [7, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}-n{}-g{}-z{:d}-p{:d}".format(*s))
def test_tc_small_tiles_scale_after(m, shape, swap):
    """K tiles of 32, several per group (the next tile's scale row is read one tile ahead,
    across group boundaries), each dot's result scaled rather than each weight."""
    k, n, group_size, zeros, act_order = shape
    qweight, scales, zero, perm = _weight(k, n, group_size, zeros, act_order, seed=11)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    config = _tc(m, 32, swap=swap, scale_after=True)
    y = w4a16_matmul(x, qweight, scales, zero, perm, group_size, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, group_size), torch.float32)


@pytest.mark.parametrize(
    "block_m, block_k, split_k", [(128, 64, 1), (256, 32, 3), (256, 128, 1)]
)  # fmt: skip
def test_tc_swapped_wide_row_tiles(block_m, block_k, split_k):
    """The swapped tiles the sweep tries from 128 rows (benchmarks/w4a16.py): 300 rows
    as row tiles of 128 or 256, the last one partial (x^T's columns past M masked), K
    tiles of 32 (one group each, scaled per weight), 64 and 128 (two and four groups),
    with act-order, zero points and split K."""
    qweight, scales, zero, perm = _weight(320, 40, 32, True, True, seed=5)
    x = torch.randn(300, 320, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    config = W4Config(block_m, 32, block_k, split_k=split_k, kernel="tc", swap=True)
    out = torch.full((300, 40), float("nan"), device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zero, perm, 32, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 32), torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}-n{}-g{}-z{:d}-p{:d}".format(*s))
def test_dot_kernel_matches_reference(shape):
    """The first dot kernel (nibble planes from 128-row tiles, else a read per row) stays
    selectable for comparison in the sweep."""
    k, n, group_size, zeros, act_order = shape
    qweight, scales, zero, perm = _weight(k, n, group_size, zeros, act_order)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    config = W4Config(16, 32, 128 if group_size in (128, -1) else group_size, kernel="dot")
    out = torch.full((7, n), float("nan"), device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zero, perm, group_size, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, group_size), torch.float32)


@pytest.mark.parametrize("swap, scale_after", [(False, False), (True, False), (False, True),
                                               (True, True)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [7, 16, 64])
def test_tc_matches_reference_half(m, dtype, swap, scale_after):
    """The weight tile is rounded once to the activation dtype before its dot (with
    scale_after: code - zero, exact, and the dot's result scaled in float32)."""
    qweight, scales, zero, perm = _weight(256, 72, 64, True, True, seed=1)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    bias = torch.randn(72, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    out = torch.full((m, 72), float("nan"), device=DEVICE, dtype=dtype)
    config = _tc(m, 64, swap=swap, scale_after=scale_after)
    y = w4a16_matmul(x, qweight, scales, zero, perm, 64, bias, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 64, bias), dtype)


@pytest.mark.parametrize("split_k, fixup, block_k", [(1, False, 64), (3, False, 64), (3, True, 32),
                                                     (5, True, 32)])  # fmt: skip
def test_tc_split_k_agrees(split_k, fixup, block_k):
    """Splits of the tensor-core kernel (the last one short) summed by the second kernel
    or in-kernel, bias added once; twice, so the fixup's counters are back at zero. Tiles
    of 64 rows hold two groups (scale_after does not apply), of 32 one."""
    qweight, scales, zero, perm = _weight(320, 40, 32, True, True, seed=2)
    x = torch.randn(20, 320, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    config = W4Config(16, 32, block_k, split_k=split_k, fixup=fixup, kernel="tc",
                      scale_after=True)  # fmt: skip
    ref = w4a16_matmul_ref(x, qweight, scales, zero, perm, 32, bias)
    for _ in range(2):
        out = torch.full((20, 40), float("nan"), device=DEVICE)
        y = w4a16_matmul(x, qweight, scales, zero, perm, 32, bias, out=out, config=config)
        _check(y, ref, torch.float32)


def test_dequant_mm_choice(monkeypatch):
    """Dequantize + mm from DEQUANT_MIN_M rows always; below it from UNTUNED_DEQUANT_MIN_M
    rows unless TUNED has tiles for the shape's rows bucket (the sweep keeps a bucket's
    tiles only where the fused kernel won); dequant_min_m=None never."""
    k, n = 512, 96
    monkeypatch.setattr(w4a16, "TUNED", {(256, k, n): _tc(256)})
    untuned = w4a16.UNTUNED_DEQUANT_MIN_M
    assert not uses_dequant_mm(16, n, k)
    assert not uses_dequant_mm(untuned - 1, n, k)
    assert uses_dequant_mm(untuned, n, k)
    assert uses_dequant_mm(128, n, k)  # bucket 128: not tuned
    assert not uses_dequant_mm(129, n, k) and not uses_dequant_mm(256, n, k)  # bucket 256
    assert uses_dequant_mm(256, n, 2 * k)  # another shape
    assert uses_dequant_mm(w4a16.DEQUANT_MIN_M, n, k)
    assert not uses_dequant_mm(4096, n, k, dequant_min_m=None)
    assert uses_dequant_mm(8, n, k, dequant_min_m=8)
    # The launcher runs the tuned tiles (block_m 64 of _tc) at 200 rows.
    assert w4a16.default_config(200, n, k, 128, torch.device(DEVICE)) == _tc(256)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_matches_reference_half(dtype, m):
    qweight, scales, zero, perm = _weight(256, 72, 64, True, True, seed=1)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    bias = torch.randn(72, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    y = w4a16_matmul(x, qweight, scales, zero, perm, 64, bias, dequant_min_m=None)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 64, bias), dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3, 5])
@pytest.mark.parametrize("block_m", [1, 16])
def test_split_k_agrees(split_k, block_m):
    """Every split count (uneven ones included, the last split short) and both loops give
    the reference's result, bias added once."""
    qweight, scales, zero, perm = _weight(320, 40, 32, True, True, seed=2)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    config = W4Config(block_m, 32, 32, split_k=split_k)
    if block_m == 1:
        x = x[:1]
    out = torch.full((x.shape[0], 40), float("nan"), device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zero, perm, 32, bias, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 32, bias), torch.float32)


@pytest.mark.parametrize("fixup", [True, False])
@pytest.mark.parametrize("block_m, planes", [(1, False), (16, False), (16, True)])
def test_group_128_tiles(block_m, planes, fixup):
    """BLOCK_K = 128 (a GPTQ group per tile): the GEMV, and the dot kernel reading each
    word once (nibble planes) or once per row; splits summed in-kernel or by a second
    kernel; zero points, act-order and a bias."""
    qweight, scales, zero, perm = _weight(512, 72, 128, True, True, seed=8)
    m = 1 if block_m == 1 else 5
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    bias = torch.randn(72, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    config = W4Config(block_m, 64, 128, split_k=3, fixup=fixup, planes=planes)
    out = torch.full((m, 72), float("nan"), device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zero, perm, 128, bias, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 128, bias), torch.float32)
    # Run twice: the fixup's counters must be back at zero after a launch.
    y = w4a16_matmul(x, qweight, scales, zero, perm, 128, bias, out=out, config=config)
    _check(y, w4a16_matmul_ref(x, qweight, scales, zero, perm, 128, bias), torch.float32)


def test_strided_rows_and_large_m_path():
    qweight, scales, zero, perm = _weight(128, 40, 64, True, True, seed=5)
    wide = torch.randn(9, 200, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    x = wide[:, 16:144]  # row stride 200
    ref = w4a16_matmul_ref(x, qweight, scales, zero, perm, 64)
    _check(w4a16_matmul(x, qweight, scales, zero, perm, 64, dequant_min_m=None), ref,
           torch.float32)
    # From dequant_min_m rows up: W dequantized once, then torch's matmul.
    _check(w4a16_matmul(x, qweight, scales, zero, perm, 64, dequant_min_m=4), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference(dtype):
    qweight, scales, zero, perm = _weight(256, 50, 32, True, True, seed=7)
    w = dequantize_w4(qweight, scales, zero, perm, 32, dtype=dtype)
    ref = dequantize_ref(qweight, scales, zero, perm, 32)
    if dtype == torch.float32:
        assert torch.equal(w, ref)  # exact: a small integer times a float16 scale
    else:  # one rounding to bf16 (the interpreter truncates where a GPU rounds: 1 ulp)
        torch.testing.assert_close(w.float(), ref, rtol=2**-7, atol=0)


def test_empty_batch():
    qweight, scales, _, _ = _weight(64, 16, 32, False, False)
    y = w4a16_matmul(torch.empty(0, 64, device=DEVICE), qweight, scales, group_size=32)
    assert y.shape == (0, 16)


def _bad(**change):
    qweight, scales, zero, perm = _weight(128, 16, 32, True, True)
    args = dict(x=torch.randn(2, 128, device=DEVICE), qweight=qweight, scales=scales,
                zeros=zero, perm=perm, group_size=32)  # fmt: skip
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 120)), "x has 120 columns"),
        (dict(x=torch.randint(0, 3, (2, 128))), "x must be one of"),
        (dict(qweight=torch.zeros(16, 16, dtype=torch.int64)), "qweight must be one of int32"),
        (dict(group_size=48), "group_size 48 does not divide"),
        (dict(group_size=24), "group_size must be -1 or a positive multiple of 16"),
        (dict(scales=torch.ones(2, 16, dtype=torch.float16)), r"scales must be \[K / group_size"),
        (dict(zeros=torch.zeros(4, 16, dtype=torch.int32)), "zeros must be one of uint8"),
        (dict(perm=torch.arange(64, dtype=torch.int32)), "perm must have K = 128"),
        (dict(bias=torch.ones(15)), "bias must have N = 16"),
        (dict(out=torch.empty(2, 16, dtype=torch.float16)), "out must be"),
        (dict(config=W4Config(16, 32, 64)), "block_k 64 must be a multiple of 16 that divides"),
        (dict(config=W4Config(16, 32, 48, kernel="tc")), r"\(or, kernel 'tc', a multiple"),
        (dict(config=W4Config(16, 32, 32, kernel="mma")), "kernel must be one of"),
    ],
)
def test_rejects_bad_arguments(change, match):
    args = _bad(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})  # fmt: skip
    with pytest.raises(ValueError, match=match):
        w4a16_matmul(**args)
