"""Fused kernels (norm, rotary, activation, sampling) against their float32 references.

Under ``TRITON_INTERPRET=1`` (see conftest.py) bf16 tolerances are a few ulps wide:
the interpreter truncates float32 -> bf16 where a GPU rounds to nearest even, so
each rounding point the kernels share with Hugging Face can land one ulp apart.
fp16 conversions round to nearest in both, and fp32 is compared to ~1e-5.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tessera.common.model_config import ModelConfig
from tessera.common.plan import SamplingOptions
from tessera.executor import sampler as torch_sampler
from tessera.executor.models.llama import RotaryEmbedding, rope_inv_freq
from tessera.executor.models.llama import rms_norm as model_rms_norm
from tessera.executor.sampling_batch import sampling_tensors
from tessera.kernels.activation import silu_and_mul, silu_and_mul_ref
from tessera.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from tessera.kernels.rotary import apply_rotary_, apply_rotary_ref, build_cos_sin_cache
from tessera.kernels.sampling import (
    SamplingTensors,
    draw,
    keep_threshold,
    process_logits,
    sample,
    sample_with_logprobs,
)

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
    with torch.device("cpu"):  # as the executor builds its tables, whatever the default device
        rotary = RotaryEmbedding(config, max_pos, torch.device(DEVICE))
        cache = build_cos_sin_cache(rope_inv_freq(config, None), max_pos, DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype)  # one fused projection
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen, device="cpu").to(DEVICE)
    expected_q, expected_k = apply_rotary_ref(q, k, positions, cache)
    torch_q, torch_k = rotary.apply(q, k, *rotary.tables(positions, q.dtype))

    apply_rotary_(q, k, positions, cache)

    assert_close(q, expected_q)
    assert_close(k, expected_k)
    assert_close(q, torch_q)
    assert_close(k, torch_k)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # v is not touched


def test_cos_sin_cache_is_the_torch_path_table() -> None:
    config = llama_config(16, 2, 1, llama3=True)
    with torch.device("cpu"):
        rotary = RotaryEmbedding(config, 100, torch.device(DEVICE))
        inv_freq = rope_inv_freq(config, None)
    cache = build_cos_sin_cache(inv_freq, 100, DEVICE)
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


# --- sampling --------------------------------------------------------------------


def tensors(
    options: list[SamplingOptions],
    counters: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingTensors:
    return sampling_tensors(
        options,
        counters if counters is not None else [0] * len(options),
        DEVICE,
        prompt_token_ids=prompts,
        output_token_ids=outputs,
        generator=torch.Generator(device="cpu").manual_seed(0),
    )


def repeated_draws(logits: torch.Tensor, option: SamplingOptions, num_draws: int) -> torch.Tensor:
    """num_draws tokens from one row [V]: the same seeded request at counters 0, 1, ..."""
    params = tensors([option] * num_draws, counters=list(range(num_draws)))
    return sample(logits[None, :].expand(num_draws, -1), params)


def kept_tokens(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> set[int]:
    """Tokens top-k, top-p and min-p keep, in float64; asserts no token is borderline."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        weights = [math.exp(scaled[t] - scaled[kept[0]]) for t in kept]
        total, mass, nucleus = sum(weights), 0.0, []
        for t, w in zip(kept, weights, strict=True):
            assert abs(mass - top_p) > 1e-4  # not on the boundary
            if mass >= top_p:
                break
            nucleus.append(t)
            mass += w / total
        kept = nucleus
    if min_p > 0.0:
        ratio = {t: math.exp(scaled[t] - scaled[kept[0]]) for t in kept}
        assert all(abs(r - min_p) > 1e-4 for r in ratio.values())
        kept = [t for t in kept if ratio[t] >= min_p]
    return set(kept)


def test_processing_matches_executor_sampler(gen) -> None:
    num_vocab = 29
    options = [
        SamplingOptions(
            temperature=0.0,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias=((3, 2.0), (3, -0.5), (28, 1.0)),
        ),
        SamplingOptions(
            temperature=0.7, repetition_penalty=0.8, min_tokens=4, min_tokens_blocked_ids=(0, 5, 5)
        ),
        SamplingOptions(temperature=1.0),  # no penalties: its row is untouched
        SamplingOptions(
            temperature=1.0,
            presence_penalty=-1.0,
            frequency_penalty=0.5,
            min_tokens=5,
            min_tokens_blocked_ids=(7,),
        ),
        SamplingOptions(temperature=1.2, repetition_penalty=2.0),  # no ids at all
    ]
    prompts = [[1, 2, 2, 9, 28], [0, 0, 4, 11], [1, 2], [6], []]
    outputs = [[2, 2, 2, 5, 17], [11, 12, 12], [3], [6, 6, 8, 0], []]
    counters = [len(o) for o in outputs]
    logits = 3 * randn(gen, len(options), num_vocab)
    before = logits.clone()

    got = process_logits(logits, tensors(options, counters, prompts, outputs))
    expected = torch_sampler.process_logits(
        logits, torch_sampler.SamplingBatch(options, prompts, outputs)
    )

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    assert torch.isinf(got[1, [0, 5]]).all() and torch.isinf(got[3, 7])  # still blocked
    _, logprobs = sample_with_logprobs(logits, tensors(options, counters, prompts, outputs))
    torch.testing.assert_close(logprobs, expected.log_softmax(dim=-1))


def test_greedy_rows_take_the_first_argmax(gen) -> None:
    num_rows, num_vocab = 6, 300
    logits = randn(gen, num_rows, num_vocab)
    logits[2, [17, 40, 250]] = 9.0  # a tie: the lowest id wins, as in torch.argmax
    logits[4] = float("-inf")  # nothing allowed: column 0, as torch.argmax
    options = [
        SamplingOptions(temperature=0.0 if i % 2 == 0 else 0.9, seed=i) for i in range(num_rows)
    ]
    params = tensors(options)
    mixed = sample(logits, params)  # the draw kernel, greedy and random rows together
    only_greedy = sample(logits[::2], tensors(options[::2]))  # the all-greedy shortcut
    expected = logits.argmax(dim=1)
    assert torch.equal(mixed[::2], expected[::2])
    assert torch.equal(only_greedy, expected[::2])
    assert mixed[2] == 17 and mixed[4] == 0
    # Split across programs, the first maximum still wins.
    assert torch.equal(draw(logits, params, split_columns=32)[::2], expected[::2])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_top_k_1_is_greedy(gen, temperature) -> None:
    logits = randn(gen, 9, 50)
    options = [SamplingOptions(temperature=temperature, top_k=1, seed=i) for i in range(9)]
    params = tensors(options, counters=list(range(9)))
    assert torch.equal(sample(logits, params), logits.argmax(dim=1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 4, 1.0, 0.0), (0.8, 0, 0.55, 0.0), (1.5, 0, 1.0, 0.3), (1.0, 6, 0.8, 0.05)],
)
def test_filtered_tokens_are_never_drawn(gen, temperature, top_k, top_p, min_p) -> None:
    num_vocab = 24
    logits = 1.5 * randn(gen, num_vocab)
    allowed = kept_tokens(logits.tolist(), temperature, top_k, top_p, min_p)
    option = SamplingOptions(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=11
    )
    drawn = set(repeated_draws(logits, option, 1500).tolist())
    assert drawn <= allowed
    assert len(allowed) == 1 or len(drawn) > 1  # it does draw, not just take the argmax


def test_top_k_uses_a_partial_sort_and_matches_the_full_sort(gen) -> None:
    logits = randn(gen, 4, 40)
    options = [
        SamplingOptions(temperature=1.0, top_k=k, top_p=p)
        for k, p in [(3, 1.0), (7, 0.6), (0, 1.0), (5, 0.9)]
    ]
    params = tensors(options)
    assert params.max_top_k == 7
    full = dataclasses.replace(params, max_top_k=0)
    partial_cut, full_cut = keep_threshold(logits, params), keep_threshold(logits, full)
    assert partial_cut is not None and full_cut is not None
    assert torch.equal(partial_cut, full_cut)
    assert partial_cut[2] == float("-inf")  # the row without filters keeps everything


def test_seeded_draw_is_independent_of_batch(gen) -> None:
    num_vocab = 40
    logits = randn(gen, 8, num_vocab)
    target = SamplingOptions(temperature=1.0, top_p=0.95, seed=1234)
    alone = sample(logits[5:6], tensors([target], counters=[17]))
    others = [
        SamplingOptions(temperature=t, seed=s, top_k=k)
        for t, s, k in [(0.0, None, 0), (0.5, 7, 3), (1.5, None, 0), (1.0, 99, 0), (0.7, 1234, 0)]
    ]
    for position in (0, 3, 5):
        batch = others[:position] + [target] + others[position:]
        counters = [3] * len(batch)
        counters[position] = 17
        rows = torch.cat((logits[:position], logits[5:6], logits[position:5]))
        assert sample(rows, tensors(batch, counters))[position] == alone[0]
    # After preemption the request is rebuilt: same seed, same counter, same token.
    assert sample(logits[5:6].clone(), tensors([target], counters=[17])) == alone
    # The counter moves the stream: draws from a flat distribution differ across counters.
    flat = torch.zeros(num_vocab)
    tokens = repeated_draws(flat, SamplingOptions(temperature=1.0, seed=1234), 40)
    assert len(set(tokens.tolist())) > 20


def test_draw_does_not_depend_on_how_the_vocabulary_is_split(gen) -> None:
    logits = randn(gen, 5, 700)
    options = [
        SamplingOptions(temperature=t, seed=i, top_k=k)
        for i, (t, k) in enumerate([(1.0, 0), (0.0, 0), (2.0, 50), (0.5, 0), (1.0, 3)])
    ]
    params = tensors(options, counters=[4, 0, 9, 2, 1])
    whole = draw(logits, params)
    for split_columns in (64, 100, 256):
        assert torch.equal(draw(logits, params, split_columns=split_columns), whole)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 0, 1.0), (1.3, 5, 0.9)])
def test_draws_follow_the_softmax(gen, temperature, top_k, top_p) -> None:
    num_vocab, num_draws = 8, 4000
    logits = randn(gen, num_vocab)
    allowed = kept_tokens(logits.tolist(), temperature, top_k, top_p, 0.0)
    mask = torch.tensor([t in allowed for t in range(num_vocab)])
    expected = (logits.double() / temperature).masked_fill(~mask, float("-inf")).softmax(0)
    option = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    counts = torch.bincount(repeated_draws(logits, option, num_draws), minlength=num_vocab)

    assert (counts[~mask] == 0).all()
    observed, wanted = counts[mask].double(), num_draws * expected[mask]
    chi_square = ((observed - wanted) ** 2 / wanted).sum().item()
    # 99.9% quantile of chi-square with (kept - 1) <= 7 degrees of freedom is <= 24.3.
    assert chi_square < 24.3
    assert 0.5 * (observed / num_draws - expected[mask]).abs().sum() < 0.03


def test_neutral_switches_change_nothing(gen) -> None:
    """Every stage on (as a CUDA graph would capture it) gives the same tokens."""
    logits = randn(gen, 4, 30)
    options = [
        SamplingOptions(temperature=0.0),
        SamplingOptions(temperature=0.9, seed=3),
        SamplingOptions(temperature=1.0, top_k=5, seed=4),
        SamplingOptions(temperature=1.1, seed=8),
    ]
    params = tensors(options, counters=[1, 2, 3, 4], prompts=[[1]] * 4, outputs=[[2]] * 4)
    assert not params.do_penalties and not params.do_min_p
    everything = dataclasses.replace(
        params, do_top_k_top_p=True, max_top_k=0, do_min_p=True, do_penalties=True
    )
    assert process_logits(logits, params) is logits  # float32, nothing to do: no copy
    assert process_logits(logits.half(), params).dtype == torch.float32
    assert torch.equal(process_logits(logits, everything), logits)
    assert torch.equal(sample(logits, everything), sample(logits, params))


def test_sampling_tensors_sets_the_switches() -> None:
    greedy = SamplingOptions(temperature=0.0, top_p=0.5)  # greedy rows filter nothing
    p = tensors([greedy, greedy])
    assert p.all_greedy and not p.do_top_k_top_p and not p.do_min_p and not p.do_penalties
    p = tensors([greedy, SamplingOptions(top_k=20), SamplingOptions(top_k=8, top_p=0.5)])
    assert not p.all_greedy and p.do_top_k_top_p and p.max_top_k == 20
    p = tensors([SamplingOptions(top_k=20), SamplingOptions(top_p=0.5, min_p=0.1)])
    assert p.max_top_k == 0 and p.do_min_p  # top-p alone needs the full sort
    p = sampling_tensors(
        [SamplingOptions(seed=(1 << 64) - 1), SamplingOptions(seed=1 << 63)],
        torch.tensor([5, 6]),
        DEVICE,
    )  # uint64 seeds, as the wire carries them, keep their bits in the int64 key
    assert p.seeds.tolist() == [-1, -(1 << 63)] and p.counters.tolist() == [5, 6]
    # Unseeded rows draw their key from the generator given.
    a, b = tensors([SamplingOptions()] * 3), tensors([SamplingOptions()] * 3)
    assert torch.equal(a.seeds, b.seeds) and len(set(a.seeds.tolist())) == 3


def test_sampling_rejects_bad_arguments() -> None:
    options = [SamplingOptions(), SamplingOptions(temperature=0.0)]
    params = tensors(options)
    logits = torch.randn(2, 10)
    cases = [
        lambda: sample(logits[0], params),  # 1-D logits
        lambda: sample(torch.randn(3, 10), params),  # row count
        lambda: sample(logits.to(torch.int32), params),  # dtype
        lambda: sample(logits, dataclasses.replace(params, top_k=params.top_k.int())),
        lambda: sample(logits, dataclasses.replace(params, seeds=params.seeds[:1])),
        lambda: sample(logits, dataclasses.replace(params, bias_values=torch.zeros(2, 3))),
        lambda: process_logits(logits.half(), params, inplace=True),
        lambda: draw(logits, params, split_columns=0),
        lambda: tensors([SamplingOptions(top_p=0.0)]),
        lambda: tensors([SamplingOptions(temperature=-1.0)]),
        lambda: tensors([SamplingOptions(top_k=-2)]),
        lambda: tensors([SamplingOptions(repetition_penalty=1.2)]),  # no token lists
        lambda: tensors(options, counters=[0]),  # counter count
        lambda: sampling_tensors(
            [SamplingOptions(logit_bias=((10, 1.0),))], [0], DEVICE, vocab_size=10
        ),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
