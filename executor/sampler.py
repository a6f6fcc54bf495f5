"""Sampling: turns each request's last-position logits into its next token.

Owns every setting of ``SamplingOptions`` and applies them to the whole batch at once,
on whatever device the logits live on. Per-request Python work is limited to building
small index tensors from the options (host to device only) and to seeding the
generators of seeded rows; device-to-host copies happen only once the tokens (and
logprobs) are final, in the closing ``tolist()`` calls.

Order of operations, as vLLM does it:

    logits [B, V], any float dtype -> float32 copy
      1. logit_bias       add each row's (token, bias) pairs
      2. min_tokens       -inf on blocked ids while len(outputs) < min_tokens
      3. penalties        repetition (prompt + outputs), frequency, presence (outputs)
    = processed logits -> logprobs (log_softmax, float32; vLLM's "raw processed"
      convention: reported before temperature and truncation, so a request's logprobs
      do not change with its temperature, top-k, top-p or min-p)
      4. greedy rows      argmax of the processed logits
      5. other rows       / temperature, top-k, top-p, min-p, then one exact draw

The draw is the exponential race: with q ~ Exp(1) per token, argmax(probs / q) is an
exact sample from probs (equivalent to Gumbel-max) and needs no cumsum or search.
Rows without a seed share one batched draw from the default generator (or the one given
to ``Sampler``). A seeded row draws its q from a fresh generator seeded by a hash of
(seed, number of output tokens so far): its token depends on nothing else in the batch
nor on its position there, and a request recomputed after preemption replays the same
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from tessera.common.plan import SamplingOptions, TokenLogprobs
from tessera.executor.transfer import to_device

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass(slots=True)
class SamplingBatch:
    """What the sampler needs about each row; built by the model runner every step."""

    options: list[SamplingOptions]  # one per row
    prompt_token_ids: list[list[int]]  # per row, for the repetition penalty
    output_token_ids: list[list[int]]  # per row: penalties, min_tokens, seed step


class Sampler:
    """Samples one token per row and, where asked, its logprobs."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Used for rows without a seed; None means torch's default generator.
        self.generator = generator

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        # logits: [B, V]
        num_rows = len(batch.options)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(
                f"logits must be [B, V] with B = {num_rows} rows, got {tuple(logits.shape)}"
            )
        if len(batch.prompt_token_ids) != num_rows or len(batch.output_token_ids) != num_rows:
            raise ValueError("SamplingBatch needs prompt and output token ids for every row")

        processed = process_logits(logits, batch)  # [B, V] float32
        num_outputs = [len(ids) for ids in batch.output_token_ids]
        sampled = sample(processed, batch.options, num_outputs, self.generator)  # [B]
        logprobs = compute_logprobs(processed, sampled, [o.logprobs for o in batch.options])
        return sampled.tolist(), logprobs


# --- 1-3: processing --------------------------------------------------------------


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Return a float32 copy of logits [B, V] with logit_bias, min_tokens and penalties."""
    processed = logits.to(torch.float32, copy=True)  # never touch the caller's tensor
    apply_logit_bias(processed, batch.options)
    apply_min_tokens(processed, batch.options, batch.output_token_ids)
    apply_penalties(processed, batch.options, batch.prompt_token_ids, batch.output_token_ids)
    return processed


def apply_logit_bias(logits: torch.Tensor, options: list[SamplingOptions]) -> None:
    """Add each row's (token, bias) pairs to logits [B, V] in place."""
    rows = [i for i, o in enumerate(options) for _ in o.logit_bias]
    if not rows:
        return
    tokens = [token for o in options for token, _ in o.logit_bias]
    biases = [bias for o in options for _, bias in o.logit_bias]
    index = (_long(rows, logits.device), _long(tokens, logits.device))
    values = torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    logits.index_put_(index, values, accumulate=True)  # a repeated token adds up


def apply_min_tokens(
    logits: torch.Tensor, options: list[SamplingOptions], output_token_ids: list[list[int]]
) -> None:
    """Set blocked ids to -inf in place for rows with fewer than min_tokens outputs."""
    blocked = [
        (i, token)
        for i, (o, outputs) in enumerate(zip(options, output_token_ids, strict=True))
        if len(outputs) < o.min_tokens
        for token in o.min_tokens_blocked_ids
    ]
    if not blocked:
        return
    rows, tokens = zip(*blocked, strict=True)
    index = (_long(rows, logits.device), _long(tokens, logits.device))
    logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def apply_penalties(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
) -> None:
    """Apply repetition, frequency and presence penalties to logits [B, V] in place.

    Repetition (HF/vLLM): a token seen in the prompt or the outputs has its logit
    divided by p if positive, multiplied by p otherwise, so it always becomes less
    likely. Then logit -= frequency * count in outputs + presence * (count > 0).
    """
    rows = [i for i, o in enumerate(options) if _has_penalty(o)]
    if not rows:
        return
    num_vocab = logits.shape[1]
    device = logits.device
    # The prompt matters only to the repetition penalty; skip reading it otherwise.
    prompts = [prompt_token_ids[i] if options[i].repetition_penalty != 1.0 else [] for i in rows]
    output_counts = _token_counts([output_token_ids[i] for i in rows], num_vocab, device)
    in_output = output_counts > 0  # [P, V]
    seen = in_output | (_token_counts(prompts, num_vocab, device) > 0)  # [P, V]

    row_index = _long(rows, device)
    repetition = _column([options[i].repetition_penalty for i in rows], device)  # [P, 1]
    frequency = _column([options[i].frequency_penalty for i in rows], device)
    presence = _column([options[i].presence_penalty for i in rows], device)

    penalised = logits[row_index]  # [P, V]
    repeated = torch.where(penalised > 0, penalised / repetition, penalised * repetition)
    penalised = torch.where(seen, repeated, penalised)
    penalised -= frequency * output_counts + presence * in_output
    logits.index_copy_(0, row_index, penalised)


def _has_penalty(o: SamplingOptions) -> bool:
    return o.repetition_penalty != 1.0 or o.frequency_penalty != 0.0 or o.presence_penalty != 0.0


def _token_counts(token_ids: list[list[int]], num_vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: [len(token_ids), V] float32."""
    counts = torch.zeros(len(token_ids), num_vocab, dtype=torch.float32, device=device)
    lengths = [len(ids) for ids in token_ids]
    if sum(lengths) == 0:
        return counts
    rows = torch.repeat_interleave(
        torch.arange(len(token_ids), device=device), _long(lengths, device)
    )
    tokens = _long(list(chain.from_iterable(token_ids)), device)
    counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
    return counts


# --- logprobs ---------------------------------------------------------------------


def compute_logprobs(
    processed: torch.Tensor, sampled: torch.Tensor, num_logprobs: list[int | None]
) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens and the top k, from the processed logits.

    processed: [B, V] float32, after steps 1-3 and before temperature and truncation.
    sampled: [B] int64. Rank counts tokens with a strictly higher logprob, plus one,
    so tied tokens share the best rank (as vLLM does).
    """
    return logprobs_to_host(logprob_tensors(processed, sampled, num_logprobs), num_logprobs)


LogprobTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def logprob_tensors(
    processed: torch.Tensor, sampled: torch.Tensor, num_logprobs: list[int | None]
) -> LogprobTensors | None:
    """The device half of compute_logprobs: launched now, read by logprobs_to_host
    later (after the next step was launched, in a pipelined executor)."""
    requested = [(i, k) for i, k in enumerate(num_logprobs) if k is not None]
    if not requested:
        return None
    row_index = _long([i for i, _ in requested], processed.device)
    logprobs = processed[row_index].log_softmax(dim=-1)  # [L, V]
    tokens = sampled[row_index]  # [L]
    token_logprobs = logprobs.gather(1, tokens[:, None])[:, 0]  # [L]
    ranks = (logprobs > token_logprobs[:, None]).sum(dim=1) + 1  # [L]
    max_k = min(max(k for _, k in requested), processed.shape[1])
    top_logprobs, top_ids = logprobs.topk(max_k, dim=1)  # [L, K], best first
    return tokens, token_logprobs, ranks, top_ids, top_logprobs


def logprobs_to_host(
    tensors: LogprobTensors | None, num_logprobs: list[int | None]
) -> list[TokenLogprobs | None]:
    """The host half of compute_logprobs (waits for the device)."""
    results: list[TokenLogprobs | None] = [None] * len(num_logprobs)
    if tensors is None:
        return results
    requested = [(i, k) for i, k in enumerate(num_logprobs) if k is not None]
    for (i, k), token, logprob, rank, ids, values in zip(
        requested, *(t.tolist() for t in tensors), strict=True
    ):
        top = tuple(zip(ids[:k], values[:k], strict=True))
        results[i] = TokenLogprobs(token_id=token, logprob=logprob, rank=rank, top=top)
    return results


# --- 4-5: choosing the token ------------------------------------------------------


def sample(
    processed: torch.Tensor,
    options: list[SamplingOptions],
    num_outputs: list[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from processed logits [B, V]: argmax for greedy rows, else drawn.

    Returns [B] int64 on the logits' device.
    """
    tokens = processed.argmax(dim=-1)  # [B]
    random_rows = [i for i, o in enumerate(options) if not o.is_greedy]
    if not random_rows:
        return tokens
    device = processed.device
    row_index = _long(random_rows, device)
    row_options = [options[i] for i in random_rows]

    logits = processed[row_index]  # [R, V], a copy
    logits /= _column([o.temperature for o in row_options], device)
    logits = filter_logits(logits, row_options)
    probs = logits.softmax(dim=-1)  # [R, V]
    noise = exponential_noise(
        probs.shape,
        [o.seed for o in row_options],
        [num_outputs[i] for i in random_rows],
        device,
        generator,
    )
    drawn = (probs / noise).argmax(dim=-1)  # [R]
    return tokens.index_copy(0, row_index, drawn)


def filter_logits(logits: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """Apply each row's top-k, top-p and min-p to temperature-scaled logits [R, V]."""
    top_k = [o.top_k for o in options]
    top_p = [o.top_p for o in options]
    min_p = [o.min_p for o in options]
    device = logits.device
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = apply_top_k_top_p(
            logits, _long(top_k, device), torch.tensor(top_p, dtype=torch.float32, device=device)
        )
    if any(p > 0.0 for p in min_p):
        logits = apply_min_p(logits, torch.tensor(min_p, dtype=torch.float32, device=device))
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Keep each row's k best tokens, then the smallest prefix of them with mass >= p.

    logits: [R, V]; top_k: [R] int64, 0 keeps all; top_p: [R] float32, 1 keeps all.
    The best token is always kept. Returns new logits with dropped tokens at -inf.

        sorted probs     0.50  0.30  0.15  0.05     top_p = 0.7
        mass before      0.00  0.50  0.80  0.95     keep while mass before < p
        kept               x     x
    """
    num_vocab = logits.shape[1]
    # Stable, so ties break by token id whatever the batch: seeded rows stay reproducible.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    k = torch.where(top_k > 0, top_k, num_vocab)[:, None]  # [R, 1]
    drop = torch.arange(num_vocab, device=logits.device) >= k  # [R, V]

    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # after top-k
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [R, V]
    # p = 1 must keep everything, even where float32 cumsum rounds up to 1 early.
    p = torch.where(top_p < 1.0, top_p, float("inf"))[:, None]  # [R, 1]
    drop |= mass_before >= p
    drop[:, 0] = False

    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob; logits [R, V], min_p [R] (0 keeps all).

    p_i / p_max = exp(l_i - l_max) whatever the normaliser, so this is a cut on logits
    and gives the same set whether or not top-k/top-p dropped tokens first.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]  # [R, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def exponential_noise(
    shape: torch.Size,
    seeds: list[int | None],
    num_outputs: list[int],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """q ~ Exp(1) of shape [R, V]; a seeded row's q depends only on (seed, num_outputs)."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    noise.exponential_(generator=generator)  # one batched draw; seeded rows overwritten
    for row, (seed, step) in enumerate(zip(seeds, num_outputs, strict=True)):
        if seed is not None:
            row_generator = torch.Generator(device=device)
            row_generator.manual_seed(stream_seed(seed, step))
            noise[row].exponential_(generator=row_generator)
    # A float32 Exp(1) draw can be exactly 0, which would make probs / q a 0 / 0 = NaN
    # on a dropped token (and argmax prefers NaN); the smallest normal float keeps it 0.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def stream_seed(seed: int, step: int) -> int:
    """64-bit generator seed for (seed, step); splitmix64 so nearby pairs look unrelated."""
    return _splitmix64(_splitmix64(seed & _MASK64) + step)


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _long(values: list[int] | tuple[int, ...], device: torch.device) -> torch.Tensor:
    return to_device(values, device, torch.long)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [N, 1]
