"""Tests of executor.sampler against plain references written out in this file."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.common.plan import SamplingOptions, TokenLogprobs
from tessera.executor.sampler import Sampler, SamplingBatch, process_logits, stream_seed

NEG_INF = float("-inf")


def make_batch(
    options: list[SamplingOptions],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingBatch:
    return SamplingBatch(
        options=options,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in options],
        output_token_ids=outputs if outputs is not None else [[] for _ in options],
    )


def seeded_sampler(seed: int = 0) -> Sampler:
    return Sampler(generator=torch.Generator().manual_seed(seed))


# --- references -------------------------------------------------------------------


def reference_process(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    """Steps 1-3, one row and one token at a time, in Python floats."""
    rows = []
    for row, o, prompt, output in zip(
        logits.float().tolist(), options, prompts, outputs, strict=True
    ):
        for token, bias in o.logit_bias:
            row[token] += bias
        if len(output) < o.min_tokens:
            for token in o.min_tokens_blocked_ids:
                row[token] = NEG_INF
        for token in range(len(row)):
            count = output.count(token)
            if token in prompt or count > 0:
                if row[token] > 0:
                    row[token] /= o.repetition_penalty
                else:
                    row[token] *= o.repetition_penalty
            row[token] -= o.frequency_penalty * count
            if count > 0:
                row[token] -= o.presence_penalty
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def reference_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> list[float]:
    """Sampling distribution after temperature, top-k, top-p and min-p, in float64."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        kept_mass = sum(probs[t] for t in kept)
        nucleus, mass = [], 0.0
        for t in kept:
            nucleus.append(t)
            mass += probs[t] / kept_mass
            # The data must not sit on the boundary, where float32 and float64 disagree.
            assert abs(mass - top_p) > 1e-4
            if mass >= top_p:
                break
        kept = nucleus
    if min_p > 0.0:
        best = max(probs[t] for t in kept)
        assert all(abs(probs[t] / best - min_p) > 1e-4 for t in kept[1:])  # kept[0] is best
        kept = [t for t in kept if probs[t] >= min_p * best]
    total = sum(probs[t] for t in kept)
    return [probs[t] / total if t in kept else 0.0 for t in range(len(probs))]


def frequencies(tokens: list[int], num_vocab: int) -> list[float]:
    counts = Counter(tokens)
    return [counts[t] / len(tokens) for t in range(num_vocab)]


# --- processing: logit_bias, min_tokens, penalties --------------------------------


@st.composite
def processing_cases(draw: st.DrawFn) -> tuple[torch.Tensor, SamplingBatch]:
    num_vocab = draw(st.integers(2, 12))
    num_rows = draw(st.integers(1, 4))
    token = st.integers(0, num_vocab - 1)
    options, prompts, outputs = [], [], []
    for _ in range(num_rows):
        options.append(
            SamplingOptions(
                temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
                repetition_penalty=draw(st.sampled_from([1.0, 0.5, 1.3, 2.0])),
                presence_penalty=draw(st.sampled_from([0.0, 0.5, -1.25])),
                frequency_penalty=draw(st.sampled_from([0.0, 0.3, -0.75])),
                min_tokens=draw(st.integers(0, 4)),
                min_tokens_blocked_ids=tuple(draw(st.lists(token, max_size=3))),
                logit_bias=tuple(
                    draw(st.lists(st.tuples(token, st.floats(-5, 5, width=32)), max_size=3))
                ),
            )
        )
        prompts.append(draw(st.lists(token, max_size=8)))
        outputs.append(draw(st.lists(token, max_size=6)))
    values = draw(
        st.lists(
            st.floats(-10, 10, width=32),
            min_size=num_rows * num_vocab,
            max_size=num_rows * num_vocab,
        )
    )
    logits = torch.tensor(values, dtype=torch.float32).reshape(num_rows, num_vocab)
    return logits, make_batch(options, prompts, outputs)


@settings(max_examples=50, deadline=None)
@given(processing_cases())
def test_process_logits_matches_loop_reference(case: tuple[torch.Tensor, SamplingBatch]) -> None:
    logits, batch = case
    before = logits.clone()
    expected = reference_process(
        logits, batch.options, batch.prompt_token_ids, batch.output_token_ids
    )
    torch.testing.assert_close(process_logits(logits, batch), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)  # the caller's logits are left alone

    # Greedy rows take the argmax of exactly these processed logits.
    tokens, _ = seeded_sampler()(logits, batch)
    for i, o in enumerate(batch.options):
        if o.is_greedy and not torch.isinf(expected[i]).all():
            assert expected[i, tokens[i]] >= expected[i].max() - 1e-4


def test_penalties_by_hand() -> None:
    logits = torch.tensor([[4.0, -1.0, 2.0, 3.0, 0.5]])
    options = SamplingOptions(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # prompt has 0 and 1; outputs have 2 twice and 1 once; 3 and 4 unseen
    batch = make_batch([options], prompts=[[0, 1]], outputs=[[2, 1, 2]])
    expected = torch.tensor(
        [
            [
                4.0 / 2,  # prompt only: repetition
                -1.0 * 2 - 0.25 * 1 - 0.5,  # negative: multiplied, then counted once
                2.0 / 2 - 0.25 * 2 - 0.5,  # output twice
                3.0,
                0.5,
            ]
        ]
    )
    torch.testing.assert_close(process_logits(logits, batch), expected)


def test_min_tokens_blocks_until_enough_outputs() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 4.5]])
    options = SamplingOptions(temperature=0.0, min_tokens=3, min_tokens_blocked_ids=(1, 4))
    for num_outputs, expected_token in [(0, 3), (1, 3), (2, 3), (3, 1), (7, 1)]:
        batch = make_batch([options], outputs=[[2] * num_outputs])
        processed = process_logits(logits, batch)
        blocked = num_outputs < 3
        assert torch.isinf(processed[0, [1, 4]]).all() == blocked
        assert torch.equal(processed[0, [0, 2, 3]], logits[0, [0, 2, 3]])
        assert seeded_sampler()(logits, batch)[0] == [expected_token]

    # Sampled rows never draw a blocked id either, however likely it was.
    sampled = SamplingOptions(temperature=1.0, min_tokens=1, min_tokens_blocked_ids=(1,))
    rows = 2000
    tokens, _ = seeded_sampler()(logits.expand(rows, -1), make_batch([sampled] * rows))
    assert 1 not in tokens
    assert set(tokens) == {0, 2, 3, 4}


def test_logit_bias_is_added() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    biased = SamplingOptions(temperature=0.0, logit_bias=((0, 10.0), (2, -1.5)))
    plain = SamplingOptions(temperature=0.0)
    batch = make_batch([biased, plain])
    processed = process_logits(logits, batch)
    torch.testing.assert_close(processed[0], torch.tensor([11.0, 2.0, 1.5, 0.0]))
    torch.testing.assert_close(processed[1], logits[1])
    assert seeded_sampler()(logits, batch)[0] == [0, 2]


# --- greedy -----------------------------------------------------------------------


def test_greedy_rows_ignore_the_rest_of_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 64, generator=g)
    greedy = [
        SamplingOptions(temperature=0.0),
        SamplingOptions(temperature=0.0, repetition_penalty=1.5, logit_bias=((5, 1.0),)),
        SamplingOptions(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9, seed=7),
    ]
    others = [
        SamplingOptions(temperature=1.2),
        SamplingOptions(temperature=0.5, top_k=4, seed=3),
        SamplingOptions(temperature=2.0, top_p=0.5, presence_penalty=1.0, logprobs=2),
    ]
    prompts = [[1, 2, 3], [int(logits[1].argmax()), 9], [4]]
    outputs = [[5], [6, 6], []]

    alone = []
    for i, o in enumerate(greedy):
        row = logits[i : i + 1]
        tokens, _ = seeded_sampler(i)(row, make_batch([o], [prompts[i]], [outputs[i]]))
        expected = reference_process(row, [o], [prompts[i]], [outputs[i]])[0].argmax()
        assert tokens == [int(expected)]
        alone.append(tokens[0])

    # Interleave greedy rows with sampled ones, in another order.
    mixed = [others[0], greedy[2], others[1], greedy[0], others[2], greedy[1]]
    where = {2: 1, 0: 3, 1: 5}
    rows = torch.randn(6, 64, generator=g)
    batch_prompts = [[0]] * 6
    batch_outputs = [[0]] * 6
    for i, position in where.items():
        rows[position] = logits[i]
        batch_prompts[position] = prompts[i]
        batch_outputs[position] = outputs[i]
    tokens, _ = seeded_sampler(99)(rows, make_batch(mixed, batch_prompts, batch_outputs))
    for i, position in where.items():
        assert tokens[position] == alone[i]


# --- sampling: distribution, top-k, top-p, min-p ----------------------------------

# probabilities with clear gaps, so the reference sets sit well away from boundaries
BASE_PROBS = [0.22, 0.17, 0.13, 0.11, 0.09, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01]

CONFIGS = [
    # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.6, 0, 1.0, 0.0),
    (1.0, 4, 1.0, 0.0),
    (1.0, 0, 0.6, 0.0),
    (1.0, 0, 1.0, 0.3),
    (1.3, 7, 0.75, 0.25),
    (0.8, 1, 1.0, 0.0),  # top-k 1: only the top token
    (1.0, 0, 1e-6, 0.0),  # tiny top-p: the top token is still kept
    (1.0, 0, 0.0, 0.0),  # even at top-p 0
    (1.0, 0, 1.0, 1.0),  # min-p 1: only the top token
]


def test_sampled_frequencies_match_reference_distribution() -> None:
    """One batch holding every config side by side, each over its own permuted vocab."""
    rows_per_config = 6000
    g = torch.Generator().manual_seed(2)
    num_vocab = len(BASE_PROBS)
    config_logits = []
    for _ in CONFIGS:
        # Random token order, so a mix-up between sorted and vocab indices shows.
        permutation = torch.randperm(num_vocab, generator=g)
        row = torch.empty(num_vocab)
        row[permutation] = torch.tensor(BASE_PROBS).log()
        config_logits.append(row)
    logits = torch.cat([row.expand(rows_per_config, -1) for row in config_logits])
    options = [
        SamplingOptions(temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in CONFIGS
        for _ in range(rows_per_config)
    ]
    tokens, _ = seeded_sampler(3)(logits, make_batch(options))

    for c, (row, (t, k, p, m)) in enumerate(zip(config_logits, CONFIGS, strict=True)):
        expected = reference_probs(row.tolist(), t, k, p, m)
        drawn = tokens[c * rows_per_config : (c + 1) * rows_per_config]
        allowed = {token for token, prob in enumerate(expected) if prob > 0}
        assert set(drawn) == allowed, (t, k, p, m)  # nothing outside, everything inside
        observed = frequencies(drawn, num_vocab)
        # Binomial sd is at most 0.0065 here; 0.025 is about four of them.
        assert max(abs(a - b) for a, b in zip(observed, expected, strict=True)) < 0.025, (
            t,
            k,
            p,
            m,
        )


def test_seeded_rows_are_exact_samples_too() -> None:
    num_vocab = 6
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, -2.0]])
    rows = 8000
    options = [SamplingOptions(temperature=0.9, seed=seed) for seed in range(rows)]
    tokens, _ = seeded_sampler()(logits.expand(rows, -1), make_batch(options))
    expected = reference_probs(logits[0].tolist(), 0.9, 0, 1.0, 0.0)
    observed = frequencies(tokens, num_vocab)
    assert max(abs(a - b) for a, b in zip(observed, expected, strict=True)) < 0.025


def test_top_k_keeps_only_the_k_best_on_a_large_vocab() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 1000, generator=g) * 0.3  # flat: many tokens are plausible
    rows = 3000
    options = [SamplingOptions(temperature=1.0, top_k=20)] * rows
    tokens, _ = seeded_sampler()(logits.expand(rows, -1), make_batch(options))
    best = set(sorted(range(1000), key=lambda t: -logits[0, t].item())[:20])
    assert set(tokens) == best


# --- seeds ------------------------------------------------------------------------


def seeded_run(seed: int, logits: torch.Tensor, steps: int) -> list[int]:
    """Tokens of one seeded request sampled alone, feeding each token back."""
    options = SamplingOptions(temperature=1.0, top_p=0.98, seed=seed)
    outputs: list[int] = []
    for step in range(steps):
        tokens, _ = Sampler()(logits[step : step + 1], make_batch([options], [[1]], [outputs[:]]))
        outputs.append(tokens[0])
    return outputs


def test_seeded_request_is_independent_of_the_batch() -> None:
    g = torch.Generator().manual_seed(5)
    num_vocab, steps = 500, 6
    logits = torch.randn(steps, num_vocab, generator=g) * 0.5  # [steps, V]
    target = SamplingOptions(temperature=1.0, top_p=0.98, seed=1234)
    alone = seeded_run(1234, logits, steps)

    neighbours = [
        SamplingOptions(temperature=0.0),
        SamplingOptions(temperature=1.0),
        SamplingOptions(temperature=0.7, top_k=5, seed=1),
        SamplingOptions(temperature=1.0, top_p=0.5, min_p=0.1, logprobs=3),
        SamplingOptions(temperature=1.5, repetition_penalty=1.3, seed=1235),
        SamplingOptions(temperature=1.0, logit_bias=((3, 2.0),), min_tokens=5),
    ]
    for size, position in [(2, 0), (2, 1), (4, 3), (7, 2), (7, 6)]:
        torch.manual_seed(size * 10 + position)  # default generator differs each layout
        outputs: list[int] = []
        for step in range(steps):
            others = [neighbours[(j + size) % len(neighbours)] for j in range(size - 1)]
            options = others[:position] + [target] + others[position:]
            batch_logits = torch.randn(size, num_vocab, generator=g)
            batch_logits[position] = logits[step]
            prompts = [[1]] * size
            all_outputs = [[2, 3]] * size
            all_outputs[position] = outputs[:]
            tokens, _ = Sampler()(batch_logits, make_batch(options, prompts, all_outputs))
            outputs.append(tokens[position])
        assert outputs == alone, (size, position)


def test_different_seeds_give_different_streams() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, 500, generator=g) * 0.5
    runs = [seeded_run(seed, logits, 8) for seed in (1, 2, 3)]
    assert runs[0] != runs[1] != runs[2] != runs[0]
    assert len(set(runs[0])) > 1  # steps draw fresh noise, not the same race each time


def test_same_seed_and_step_reproduce() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 500, generator=g) * 0.5
    options = [SamplingOptions(temperature=1.0, seed=42)]
    first, _ = Sampler()(logits, make_batch(options, outputs=[[1, 2, 3]]))
    torch.manual_seed(12345)
    # Only the number of outputs sets the stream, as after preemption and recompute.
    again, _ = Sampler()(logits, make_batch(options, outputs=[[9, 8, 7]]))
    later, _ = Sampler()(logits, make_batch(options, outputs=[[9, 8, 7, 6]]))
    assert again == first
    assert stream_seed(42, 3) == stream_seed(42, 3) != stream_seed(42, 4) != stream_seed(43, 3)
    # Another step is another draw; over a few steps some token must change.
    steps = [Sampler()(logits, make_batch(options, outputs=[[0] * n]))[0][0] for n in range(3, 9)]
    assert steps[0] == first[0] and len(set(steps)) > 1
    assert later[0] == steps[1]


# --- logprobs ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_match_log_softmax_of_processed_logits(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(8)
    num_rows, num_vocab = 48, 40
    logits = (torch.randn(num_rows, num_vocab, generator=g) * 3).to(dtype)
    choices = [None, 0, 1, 3, 40, 100]  # 100 > V: all of them
    options = [
        SamplingOptions(
            temperature=[0.0, 2.0, 0.5][i % 3],
            top_k=[0, 10][i % 2],
            repetition_penalty=[1.0, 1.4][i % 2],
            frequency_penalty=[0.0, 0.5][(i // 2) % 2],
            logit_bias=((i % num_vocab, 1.0),),
            logprobs=choices[i % len(choices)],
        )
        for i in range(num_rows)
    ]
    prompts = [[i % num_vocab, 3] for i in range(num_rows)]
    outputs = [[(i * 7) % num_vocab] * (i % 3) for i in range(num_rows)]
    tokens, results = seeded_sampler(9)(logits, make_batch(options, prompts, outputs))

    # Reference: float32 log_softmax of the processed logits; no temperature, no top-k.
    expected = torch.log_softmax(reference_process(logits, options, prompts, outputs), dim=-1)
    ranks = []
    for i, (o, result) in enumerate(zip(options, results, strict=True)):
        if o.logprobs is None:
            assert result is None
            continue
        assert isinstance(result, TokenLogprobs)
        row = expected[i]
        assert result.token_id == tokens[i]
        assert result.logprob == pytest.approx(row[tokens[i]].item(), abs=1e-4)
        assert result.rank == 1 + int((row > row[tokens[i]]).sum())
        ranks.append(result.rank)
        # Low-precision logits tie, so check values, and ids by their values.
        k = min(o.logprobs, num_vocab)
        top_ids = [token for token, _ in result.top]
        values = [value for _, value in result.top]
        assert len(set(top_ids)) == k
        assert values == sorted(values, reverse=True)
        best_values = sorted(row.tolist(), reverse=True)[:k]
        assert values == pytest.approx(best_values, abs=1e-4)
        assert values == pytest.approx([row[t].item() for t in top_ids], abs=1e-4)
    assert any(rank > 1 for rank in ranks)  # sampled rows exercise ranks beyond the top


def test_logprobs_do_not_depend_on_temperature_or_truncation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    results = []
    for o in [
        SamplingOptions(temperature=0.0, logprobs=2),
        SamplingOptions(temperature=0.01, top_k=1, logprobs=2),
        SamplingOptions(temperature=5.0, top_p=1e-6, min_p=0.9, logprobs=2),
    ]:
        tokens, (result,) = seeded_sampler()(logits, make_batch([o]))
        assert tokens == [0]  # truncation leaves only the top token
        results.append(result)
    assert results[0] == results[1] == results[2]
    assert results[0] is not None and results[0].rank == 1
    assert results[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())


def test_mismatched_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(3, 5), make_batch([SamplingOptions()] * 2))
