"""Fused kernels (norm, rotary, activation) against their float32 references.

Under ``TRITON_INTERPRET=1`` (see conftest.py) bf16 tolerances are a few ulps wide:
the interpreter truncates float32 -> bf16 where a GPU rounds to nearest even, so
each rounding point the kernels share with Hugging Face can land one ulp apart.
fp16 conversions round to nearest in both, and fp32 is compared to ~1e-5.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from executor.model import RotaryEmbedding, rope_inv_freq
from executor.model import rms_norm as model_rms_norm
from executor.model_config import ModelConfig
from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary_, apply_rotary_ref, build_cos_sin_cache

# On a GPU the kernels run for real; elsewhere conftest.py has set TRITON_INTERPRET=1.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@pytest.fixture(autouse=True)
def on_device() -> Iterator[None]:
    """Tensors the tests make without a device land on DEVICE."""
    with torch.device(DEVICE):
        yield


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per case, same on every run."""
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device="cpu").to(DEVICE, dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --- RMSNorm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, hidden", [(1, 7), (5, 37), (3, 130)])
def test_rms_norm_matches_reference(gen, dtype, num_tokens, hidden) -> None:
    wide = randn(gen, num_tokens, hidden + 5, dtype=dtype)
    x = wide[:, 2 : 2 + hidden]  # rows strided, as slices of a larger buffer are
    weight = (1.0 + 0.1 * randn(gen, hidden)).to(dtype)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype)  # poisoned

    result = rms_norm(x, weight, 1e-5, out=out)

    assert result is out
    assert_close(out, rms_norm_ref(x, weight, 1e-5))
    assert_close(out, model_rms_norm(x, weight, 1e-5))  # what the torch path computes


def test_rms_norm_in_place_and_empty(gen) -> None:
    x = randn(gen, 4, 33)
    weight = randn(gen, 33)
    expected = rms_norm_ref(x, weight, 1e-6)
    rms_norm(x, weight, 1e-6, out=x)
    assert_close(x, expected)
    assert rms_norm(torch.empty(0, 33), weight, 1e-6).shape == (0, 33)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(gen, dtype) -> None:
    num_tokens, hidden = 5, 61
    x = randn(gen, num_tokens, 2 * hidden, dtype=dtype)[:, :hidden]  # strided rows
    residual = randn(gen, num_tokens, hidden, dtype=dtype)
    weight = (1.0 + 0.1 * randn(gen, hidden)).to(dtype)
    expected_x, expected_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    beside = x.as_strided((num_tokens, hidden), x.stride(), x.storage_offset() + hidden).clone()

    fused_add_rms_norm(x, residual, weight, 1e-6)

    assert_close(residual, expected_residual)
    assert_close(x, expected_x)
    # The other half of each row of x's buffer is not touched.
    assert torch.equal(
        x.as_strided((num_tokens, hidden), x.stride(), x.storage_offset() + hidden), beside
    )
    # The torch path: h = h + x; x = rms_norm(h).
    assert_close(x, model_rms_norm(expected_residual, weight, 1e-6))


def test_norm_rejects_bad_arguments() -> None:
    x, w = torch.randn(3, 8), torch.randn(8)
    cases = [
        lambda: rms_norm(x, torch.randn(7), 1e-6),  # weight size
        lambda: rms_norm(x[None], w, 1e-6),  # 3-D
        lambda: rms_norm(x.to(torch.int32), w, 1e-6),  # dtype
        lambda: rms_norm(x.t(), torch.randn(3), 1e-6),  # non-unit last stride
        lambda: rms_norm(x, w, 1e-6, out=torch.empty(3, 7)),  # out shape
        lambda: rms_norm(x, w, 1e-6, out=torch.empty(3, 8, dtype=torch.float16)),  # out dtype
        lambda: fused_add_rms_norm(x, torch.randn(4, 8), w, 1e-6),  # residual shape
        lambda: fused_add_rms_norm(x, torch.randn(3, 8).half(), w, 1e-6),  # residual dtype
        lambda: rms_norm(x, w, 1e-6, out=torch.empty(3, 8, device="meta")),  # device
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


# --- rotary ----------------------------------------------------------------------


def llama_config(head_dim: int, num_heads: int, num_kv_heads: int, llama3: bool) -> ModelConfig:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # small, so all three bands occur
    }
    return ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=num_heads * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=500000.0 if llama3 else 10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_scaling=scaling if llama3 else None,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, llama3",
    [(4, 2, 10, False), (6, 1, 32, True), (3, 3, 18, True)],
)
def test_rotary_matches_reference_and_torch_path(
    gen, dtype, num_heads, num_kv_heads, head_dim, llama3
) -> None:
    config = llama_config(head_dim, num_heads, num_kv_heads, llama3)
    max_pos, num_tokens = 300, 7
    cache = build_cos_sin_cache(rope_inv_freq(config, None), max_pos, DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype)  # one fused projection
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen, device="cpu").to(DEVICE)
    expected_q, expected_k = apply_rotary_ref(q, k, positions, cache)
    torch_q, torch_k = RotaryEmbedding(config, max_pos, torch.device(DEVICE)).apply(q, k, positions)

    apply_rotary_(q, k, positions, cache)

    assert_close(q, expected_q)
    assert_close(k, expected_k)
    assert_close(q, torch_q)
    assert_close(k, torch_k)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # v is not touched


def test_cos_sin_cache_is_the_torch_path_table() -> None:
    config = llama_config(16, 2, 1, llama3=True)
    rotary = RotaryEmbedding(config, 100, torch.device(DEVICE))
    cache = build_cos_sin_cache(rope_inv_freq(config, None), 100, DEVICE)
    assert cache.shape == (100, 16) and cache.dtype == torch.float32
    assert torch.equal(cache[:, :8], rotary.cos[:, :8])
    assert torch.equal(cache[:, 8:], rotary.sin[:, :8])


def test_rotary_rejects_bad_arguments() -> None:
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    pos, cache = torch.zeros(3, dtype=torch.int64), torch.randn(10, 8)
    cases = [
        lambda: apply_rotary_(q, k.half(), pos, cache),  # dtypes differ
        lambda: apply_rotary_(q, torch.randn(2, 2, 8), pos, cache),  # token count
        lambda: apply_rotary_(q, torch.randn(3, 2, 6), pos, cache),  # head size
        lambda: apply_rotary_(q, k, pos[:2], cache),  # positions length
        lambda: apply_rotary_(q, k, pos.float(), cache),  # positions dtype
        lambda: apply_rotary_(q, k, pos, torch.randn(10, 6)),  # cache width
        lambda: apply_rotary_(
            torch.randn(3, 4, 7), torch.randn(3, 2, 7), pos, torch.randn(10, 7)
        ),  # odd head size
        lambda: apply_rotary_(q.transpose(1, 2), k, pos, cache),  # non-unit last stride
        lambda: apply_rotary_(q[0], k, pos, cache),  # 2-D q
        lambda: build_cos_sin_cache(torch.ones(2, 2), 10, DEVICE),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


# --- SiLU and multiply -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, inter", [(1, 1), (4, 37), (3, 2100)])
def test_silu_and_mul_matches_reference(gen, dtype, num_tokens, inter) -> None:
    x = (3 * randn(gen, num_tokens, 2 * inter + 3, dtype=dtype))[:, : 2 * inter]  # strided
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype)  # poisoned

    result = silu_and_mul(x, out=out)

    assert result is out
    assert_close(out, silu_and_mul_ref(x))
    gate, up = x.chunk(2, dim=-1)
    assert_close(out, F.silu(gate) * up)  # what the torch path computes


def test_silu_and_mul_rejects_bad_arguments() -> None:
    x = torch.randn(3, 8)
    cases = [
        lambda: silu_and_mul(torch.randn(3, 7)),  # odd width
        lambda: silu_and_mul(x, out=torch.empty(3, 8)),  # out shape
        lambda: silu_and_mul(x, out=torch.empty(3, 4, dtype=torch.float16)),  # out dtype
        lambda: silu_and_mul(x[None]),  # 3-D
        lambda: silu_and_mul(x.t()),  # non-unit last stride
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
