"""One step's sampling settings, from the plan's per-request options to the kernels' tensors.

The kernels (``tessera.kernels.sampling``) take tensors and plain values only; this module
reads the plan's ``SamplingOptions``, checks them, packs every row into one int64 and one
float32 host tensor, and copies each to the device once, asynchronously from pinned memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from tessera.common.plan import SamplingOptions
from tessera.common.sampling_fields import check_all
from tessera.executor.transfer import to_device
from tessera.kernels.sampling import SamplingTensors

_MASK64 = (1 << 64) - 1


def sampling_tensors(
    options: Sequence[SamplingOptions],
    counters: Sequence[int] | torch.Tensor,
    device: torch.device | str,
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    checked: bool = False,
) -> SamplingTensors:
    """Tensors for one batch, one row per option, in batch order.

    counters: tokens each request has generated so far (host list, or a [B] int64
    tensor already on the device). prompt/output ids are needed only when some
    row has a penalty, and read only for those rows. vocab_size, if given,
    checks logit_bias and blocked ids on the host. generator seeds unseeded rows.
    checked: every option passed check_option already (the model runner checks a
    request's once, when it arrives: checking 256 rows in every step cost about a
    millisecond of the executor's host time per step).
    """
    num_rows = len(options)
    if not checked:
        for o in options:
            check_option(o, vocab_size)
    random_rows = [o for o in options if not o.is_greedy]
    penalised = [o.has_penalty for o in options]
    if any(penalised) and (prompt_token_ids is None or output_token_ids is None):
        raise ValueError("rows with penalties need prompt_token_ids and output_token_ids")
    for name, lists in (("prompt", prompt_token_ids), ("output", output_token_ids)):
        if lists is not None and len(lists) != num_rows:
            raise ValueError(f"{name}_token_ids has {len(lists)} rows for {num_rows} options")

    seeds = torch.randint(0, 1 << 62, (num_rows,), generator=generator, device="cpu").tolist()
    seeds = [
        _as_int64(o.seed) if o.seed is not None else s
        for o, s in zip(options, seeds, strict=True)
    ]
    host_counters = None if isinstance(counters, torch.Tensor) else list(counters)
    if host_counters is not None and len(host_counters) != num_rows:
        raise ValueError(f"{len(counters)} counters for {num_rows} options")
    biases: list[dict[int, float]] = [{} for _ in options]
    for row, o in zip(biases, options, strict=True):
        for token, bias in o.logit_bias:  # a repeated token adds up
            row[token] = row.get(token, 0.0) + bias
    # Penalty lists only for rows that use them; the prompt only for repetition.
    no_ids: Sequence[Sequence[int]] = [()] * num_rows
    prompt_lists = prompt_token_ids if prompt_token_ids is not None else no_ids
    output_lists = output_token_ids if output_token_ids is not None else no_ids
    prompts = [
        ids if p and o.repetition_penalty != 1.0 else ()
        for o, p, ids in zip(options, penalised, prompt_lists, strict=True)
    ]
    outputs = [ids if p else () for p, ids in zip(penalised, output_lists, strict=True)]

    # Everything in one int64 and one float32 host tensor: two copies to the device.
    # Greedy rows filter nothing: neutral values keep them out of the switches.
    ints = _Packer(num_rows, -1)
    ints.add_row([0 if o.is_greedy else o.top_k for o in options])
    ints.add_row(seeds)
    ints.add_row([o.min_tokens for o in options])
    if host_counters is not None:
        ints.add_row(host_counters)
    ints.add_lists([o.min_tokens_blocked_ids for o in options])
    ints.add_lists([list(b) for b in biases])
    ints.add_lists(prompts)
    ints.add_lists(outputs)
    floats = _Packer(num_rows, 0.0)
    floats.add_row([o.temperature for o in options])
    floats.add_row([1.0 if o.is_greedy else o.top_p for o in options])
    floats.add_row([0.0 if o.is_greedy else o.min_p for o in options])
    floats.add_row([o.repetition_penalty for o in options])
    floats.add_row([o.presence_penalty for o in options])
    floats.add_row([o.frequency_penalty for o in options])
    floats.add_lists([list(b.values()) for b in biases])
    i = ints.to(device, torch.int64)
    f = floats.to(device, torch.float32)
    top_k, seed_tensor, min_tokens = next(i), next(i), next(i)
    if isinstance(counters, torch.Tensor):
        counter_tensor = counters.to(device=device, dtype=torch.int64)
    else:
        counter_tensor = next(i)

    top_k_rows = [o for o in random_rows if o.top_k > 0 or o.top_p < 1.0]
    return SamplingTensors(
        top_k=top_k,
        seeds=seed_tensor,
        min_tokens=min_tokens,
        counters=counter_tensor,
        blocked_token_ids=next(i),
        bias_token_ids=next(i),
        prompt_token_ids=next(i),
        output_token_ids=next(i),
        temperature=next(f),
        top_p=next(f),
        min_p=next(f),
        repetition_penalty=next(f),
        presence_penalty=next(f),
        frequency_penalty=next(f),
        bias_values=next(f),
        all_greedy=not random_rows,
        do_top_k_top_p=bool(top_k_rows),
        max_top_k=0
        if any(o.top_k == 0 for o in top_k_rows)
        else max((o.top_k for o in top_k_rows), default=0),
        do_min_p=any(o.min_p > 0.0 for o in random_rows),
        do_penalties=any(penalised),
    )


class _Packer:
    """Collects [B] rows and padded [B, L] lists into one flat host tensor.

    ``to`` copies it to the device once and yields the pieces as views, in the
    order they were added.
    """

    def __init__(self, num_rows: int, pad: float) -> None:
        self.num_rows = num_rows
        self.pad = pad
        self.values: list[float] = []
        self.shapes: list[tuple[int, ...]] = []

    def add_row(self, row: Sequence[float]) -> None:
        self.values.extend(row)
        self.shapes.append((self.num_rows,))

    def add_lists(self, lists: Sequence[Sequence[float]]) -> None:
        width = max(map(len, lists), default=0)
        if width == 0:  # (the usual case: no row has such a list)
            self.shapes.append((self.num_rows, 0))
            return
        for r in lists:
            self.values.extend(r)
            self.values.extend([self.pad] * (width - len(r)))
        self.shapes.append((self.num_rows, width))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        flat = to_device(torch.tensor(self.values, dtype=dtype, device="cpu"), device)
        start = 0
        for shape in self.shapes:
            size = math.prod(shape)
            yield flat[start : start + size].view(shape)
            start += size


def check_option(o: SamplingOptions, vocab_size: int | None) -> None:
    """ValueError unless ``o`` is in the declared ranges (common/sampling_fields.py) and,
    given ``vocab_size``, its biased and blocked token ids are in the vocabulary."""
    check_all(o)
    if vocab_size is not None:
        ids = [t for t, _ in o.logit_bias] + list(o.min_tokens_blocked_ids)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def _as_int64(seed: int) -> int:
    """Any Python int as the signed 64-bit pattern of its low 64 bits (the Philox key)."""
    bits = seed & _MASK64
    return bits - (1 << 64) if bits >> 63 else bits
