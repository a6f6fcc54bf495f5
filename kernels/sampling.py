"""Batched sampling on the device: one token per row, no host synchronisation.

DESIGN. ``sample(logits, params)`` runs the steps of ``executor.sampler`` (same order,
same formulas) as a fixed sequence of batched device ops, none of which reads a
tensor back to the host, and none of which loops over requests in Python:

    logits [B, V] -> float32 copy ("processed"; no copy if fp32 and 1-3 are off)
      1. logit_bias     scatter_add of padded (id, bias) pairs           [B, Lb]
      2. min_tokens     scatter_add of -inf on blocked ids where counter < min_tokens
      3. penalties      sparse, over padded prompt/output id lists (below) [B, L]
    -> processed (the logprobs of the logprob path are log_softmax of this)
      4. filtering      one threshold per row, keep logits >= cut[b] (torch, below)
      5. the draw       Triton: one pass over the row, Gumbel-max, argmax

Which stages run is decided on the host from the options (``SamplingTensors``'s
``do_*`` switches), never from device data; a stage switched on for rows whose
values are neutral (penalty 1 or 0, top_k 0, top_p 1, min_p 0) changes nothing, so
a CUDA graph may be captured with every switch on.

Penalties without a [B, V] count matrix. Each row carries its prompt and output ids
padded to a common width with -1. Every list entry (prompt or output) computes the
final logit of its token from the untouched logit, the token's count in the outputs
and whether it occurs in the prompt (both by ``searchsorted`` in sorted copies of
the lists), and scatters it back. Entries for the same token write the same value,
so duplicate writes are harmless; pads repeat the row's first real id for the same
reason. Cost O(B * L log L) and no V-sized temporary besides the logits.

Filtering as a threshold. top-k, top-p and min-p each keep a prefix of the row
sorted by logit, so together they keep ``logits >= cut`` with one ``cut`` per row:
top-k's k-th largest logit, top-p's smallest kept logit (softmax of logits / T,
over the top-k set, mass before a token < p), min-p's ``max + T * log(min_p)``. The
sort is ``topk(max_top_k)`` when every filtering row has a top-k, a full sort only
when some row has top-p alone. Tokens tied with the cut are all kept (set-based,
so a seeded row's draw cannot depend on how a sort broke ties).

The draw. ``argmax(l / T + g)`` with ``g = -log(-log(u))`` Gumbel noise is an exact
sample from ``softmax(l / T)`` over the kept tokens (the same as the exponential race
``argmax(p / E)``, ``E = -log(u)``), in one pass, with no normaliser, cumsum or
sort. ``u`` comes from Philox-4x32-10 keyed by the row's 64-bit seed; one call, with
counter words ``(c // 4, tokens generated so far, 0, 0)``, gives columns 4j..4j+3:

    u[b, c] = (philox(key=seed[b], ctr=(c // 4, counter[b], 0, 0))[c % 4] >> 8 + 0.5) / 2^24

in (0, 1), so a seeded request draws the same token alone or in any batch, and again
after preemption, on any GPU or under the interpreter. Unseeded rows get a random
seed from the host when the tensors are built. Greedy rows (T = 0) take the first
argmax of the processed logits. The vocabulary is split into chunks (finer for
small batches, so that a batch of one still fills the GPU); each program keeps its
chunk's best (score, id), and a [B, splits] argmax picks the winner (first maximum
wins, as in ``torch.argmax``), so the token does not depend on the split. A
vocabulary smaller than one block (tests, toy models) packs several rows into one
program instead.

Host cost. ``tessera.executor.sampling_batch`` packs everything into one int64 and one
float32 tensor and copies each to the device once, asynchronously from pinned memory. The penalty
lists are O(batch tokens) of Python work per step; an executor that keeps prompt
and output ids in persistent device buffers can fill those fields with views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessera.kernels._checks import FLOAT_DTYPES, check_devices, check_tensor

_MAX_BLOCK = 1024  # columns a draw program holds at once
_MAX_SPLIT_COLUMNS = 16384  # columns one draw program scans, at most
_TARGET_PROGRAMS = 512  # enough to fill an H100's 132 SMs a few times over


# --- the draw -------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_rows", "split_columns", "num_splits"])
def _draw_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    cut_ptr,
    seed_ptr,
    counter_ptr,
    best_score_ptr,  # [B, num_splits] float32
    best_id_ptr,  # [B, num_splits] int64
    num_rows,
    vocab,
    split_columns,
    num_splits,
    HAS_CUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
):
    # A [ROWS, BLOCK] tile: ROWS > 1 only when the vocabulary is smaller than a block.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    row_ok = rows < num_rows
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    greedy = temperature == 0.0
    inv_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    cut = tl.full([ROWS], float("-inf"), tl.float32)
    if HAS_CUT:
        cut = tl.load(cut_ptr + rows, mask=row_ok & (temperature != 0.0), other=float("-inf"))
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)[:, None]
    step = tl.load(counter_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]

    start = split * split_columns
    lanes = tl.arange(0, BLOCK)
    quads = tl.arange(0, BLOCK // 4)
    # Each lane keeps its own best; strict > keeps the earliest column of a lane.
    best = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([ROWS, BLOCK], tl.int64) + (start + lanes)[None, :]
    for i in range(BLOCKS_PER_SPLIT):
        first_col = start + i * BLOCK
        cols = first_col + lanes  # [BLOCK]
        in_row = row_ok[:, None] & (cols < vocab)[None, :]
        logit = tl.load(
            logits_ptr + rows[:, None] * stride_row + cols[None, :],
            mask=in_row,
            other=float("-inf"),
        ).to(tl.float32)
        # One Philox call gives the 4 words of columns 4j..4j+3, counter (j, step): the
        # 64-bit offset's low and high halves. Joined so column 4j + m gets word m.
        quad = (first_col // 4 + quads).to(tl.int64)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, (step << 32) | quad)
        bits = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, BLOCK])
        u = ((bits >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08  # 2^-24: u in (0, 1)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(greedy[:, None], logit, logit * inv_temperature[:, None] + gumbel)
        score = tl.where(in_row & (logit >= cut[:, None]), score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_id = tl.where(better, cols[None, :].to(tl.int64), best_id)
    top = tl.max(best, axis=1)  # [ROWS]
    # Ties: lowest id. A chunk that is all -inf keeps its initial ids: its first column.
    first = tl.min(tl.where(best == top[:, None], best_id, vocab), axis=1)
    out = rows * num_splits + split
    tl.store(best_score_ptr + out, top, mask=row_ok)
    tl.store(best_id_ptr + out, first, mask=row_ok)


def draw(
    processed: torch.Tensor,  # [B, V] float: logits after bias, min_tokens, penalties
    params: SamplingTensors,
    *,
    split_columns: int | None = None,  # vocabulary columns per program; None: by shape
) -> torch.Tensor:
    """Steps 4-5: one token per row, [B] int64; greedy rows take the first argmax."""
    _check_logits(processed, params)
    if split_columns is not None and split_columns < 1:
        raise ValueError(f"split_columns must be positive, got {split_columns}")
    return _draw(processed, params, split_columns)


def _draw(
    processed: torch.Tensor, params: SamplingTensors, split_columns: int | None
) -> torch.Tensor:
    num_rows, vocab = processed.shape
    if params.all_greedy or num_rows == 0:
        return processed.argmax(dim=1)
    cut = keep_threshold(processed, params)
    if split_columns is None:
        # About _TARGET_PROGRAMS programs: a small batch splits its rows finer.
        split_columns = triton.next_power_of_2(triton.cdiv(num_rows * vocab, _TARGET_PROGRAMS))
        split_columns = min(max(split_columns, _MAX_BLOCK), _MAX_SPLIT_COLUMNS)
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK, triton.next_power_of_2(split_columns))
    block = max(block, 4)  # one Philox call fills four columns
    blocks_per_split = triton.cdiv(min(split_columns, vocab), block)
    split_columns = blocks_per_split * block
    num_splits = triton.cdiv(vocab, split_columns)
    rows = min(triton.next_power_of_2(num_rows), max(1, _MAX_BLOCK // block))
    best_score = torch.empty((num_rows, num_splits), dtype=torch.float32, device=processed.device)
    best_id = torch.empty((num_rows, num_splits), dtype=torch.int64, device=processed.device)
    _draw_kernel[(triton.cdiv(num_rows, rows), num_splits)](
        processed,
        processed.stride(0),
        params.temperature,
        cut if cut is not None else params.temperature,  # unread without a cut
        params.seeds,
        params.counters,
        best_score,
        best_id,
        num_rows,
        vocab,
        split_columns,
        num_splits,
        HAS_CUT=cut is not None,
        ROWS=rows,
        BLOCK=block,
        BLOCKS_PER_SPLIT=blocks_per_split,
        num_warps=4 if rows * block >= 512 else 2,
    )
    if num_splits == 1:
        return best_id[:, 0]
    winner = best_score.argmax(dim=1, keepdim=True)  # first maximum: lowest split
    return best_id.gather(1, winner)[:, 0]


# --- step 4: the keep threshold ----------------------------------------------------


def keep_threshold(processed: torch.Tensor, params: SamplingTensors) -> torch.Tensor | None:
    """Per-row cut [B] float32: top-k, top-p and min-p keep ``processed >= cut``.

    None when no row filters. Greedy rows' cuts are ignored by the draw.

        top-k = 3, top-p = 0.7:
        sorted logits   4.0   3.5   3.0   1.0
        probs (top-k)   0.50  0.30  0.20  -        (softmax of logits / T over the top 3)
        mass before     0.00  0.50  0.80  -        kept while mass before < p
        cut_k = 3.0, cut_p = 3.5  ->  cut = 3.5
    """
    num_vocab = processed.shape[1]
    temperature = torch.where(params.temperature > 0, params.temperature, 1.0)  # [B]
    cut = None
    row_max = None
    if params.do_top_k_top_p:
        width = num_vocab if params.max_top_k == 0 else min(params.max_top_k, num_vocab)
        if width == num_vocab:
            top = processed.sort(dim=1, descending=True).values  # [B, V]
        else:
            top = processed.topk(width, dim=1).values  # [B, K], descending
        row_max = top[:, 0]
        k = torch.where(params.top_k > 0, params.top_k.clamp(max=width), width)  # [B]
        cut_k = top.gather(1, (k - 1)[:, None])[:, 0]
        cut_k = torch.where(params.top_k > 0, cut_k, float("-inf"))

        beyond_k = torch.arange(width, device=processed.device)[None, :] >= k[:, None]
        probs = (top / temperature[:, None]).masked_fill(beyond_k, float("-inf")).softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs  # as executor.sampler computes it
        num_kept = (mass_before < params.top_p[:, None]).sum(dim=1).clamp(1, width)
        cut_p = top.gather(1, (num_kept - 1)[:, None])[:, 0]
        cut_p = torch.where(params.top_p < 1.0, cut_p, float("-inf"))
        cut = torch.maximum(cut_k, cut_p)
    if params.do_min_p:
        if row_max is None:
            row_max = processed.amax(dim=1)
        # p / p_max >= min_p  <=>  l / T >= max / T + log(min_p)
        cut_m = row_max + temperature * torch.log(params.min_p)
        cut_m = torch.where(params.min_p > 0, cut_m, float("-inf"))
        cut = cut_m if cut is None else torch.maximum(cut, cut_m)
    return cut


# --- steps 1-3: processing ---------------------------------------------------------


def process_logits(
    logits: torch.Tensor, params: SamplingTensors, *, inplace: bool = False
) -> torch.Tensor:
    """Steps 1-3 on a float32 copy of logits [B, V], or on logits itself if ``inplace``.

    float32 logits that no stage touches (no bias, no min_tokens ids, penalties
    switched off) are returned as they are, uncopied: treat the result as read-only.
    """
    _check_logits(logits, params)
    if inplace and logits.dtype != torch.float32:
        raise ValueError(f"inplace processing needs float32 logits, got {logits.dtype}")
    return _process(logits, params, inplace)


def _process(logits: torch.Tensor, params: SamplingTensors, inplace: bool) -> torch.Tensor:
    has_bias = params.bias_token_ids.shape[1] > 0
    has_blocked = params.blocked_token_ids.shape[1] > 0
    if inplace or (
        logits.dtype == torch.float32
        and not has_bias
        and not has_blocked
        and not params.do_penalties
    ):
        processed = logits
    else:
        processed = logits.to(torch.float32, copy=True)  # never touch the caller's tensor
    if has_bias:
        ids = params.bias_token_ids
        values = torch.where(ids >= 0, params.bias_values, 0.0)  # pads add 0 to column 0
        processed.scatter_add_(1, ids.clamp_min(0), values)
    if has_blocked:
        ids = params.blocked_token_ids
        active = (params.counters < params.min_tokens)[:, None]  # [B, 1]
        values = torch.where((ids >= 0) & active, float("-inf"), 0.0)
        processed.scatter_add_(1, ids.clamp_min(0), values)
    if params.do_penalties:
        apply_penalties(processed, params)
    return processed


def apply_penalties(processed: torch.Tensor, params: SamplingTensors) -> None:
    """Repetition (prompt + outputs), frequency and presence (outputs), in place.

    Per token, as ``executor.sampler.apply_penalties``: if seen, l = l / r when
    l > 0 else l * r; then l -= frequency * count + presence * (count > 0).
    """
    output = params.output_token_ids  # [B, Lo]
    prompt = params.prompt_token_ids  # [B, Lp]
    ids = torch.cat((output, prompt), dim=1)  # [B, L]
    if ids.shape[1] == 0:
        return
    num_vocab = processed.shape[1]
    valid = ids >= 0
    # Pads take the row's first real id (writing the same value as it does); in a row
    # without ids they point at column 0 and, unseen, write it back unchanged.
    first = ids.gather(1, valid.to(torch.int32).argmax(dim=1, keepdim=True)).clamp_min(0)
    ids = torch.where(valid, ids, first)

    count = _occurrences(output, ids, num_vocab)  # [B, L] int64
    in_prompt = _occurrences(prompt, ids, num_vocab) > 0
    in_output = count > 0

    logit = processed.gather(1, ids)  # [B, L]
    repetition = params.repetition_penalty[:, None]
    repeated = torch.where(logit > 0, logit / repetition, logit * repetition)
    logit = torch.where(in_output | in_prompt, repeated, logit)
    logit = logit - (
        params.frequency_penalty[:, None] * count + params.presence_penalty[:, None] * in_output
    )
    processed.scatter_(1, ids, logit)


def _occurrences(lists: torch.Tensor, ids: torch.Tensor, num_vocab: int) -> torch.Tensor:
    """How often each ids[b, j] occurs among the real (>= 0) entries of lists[b]."""
    if lists.shape[1] == 0:
        return torch.zeros_like(ids)
    ordered = torch.where(lists >= 0, lists, num_vocab).sort(dim=1).values  # pads last
    return torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)


# --- entry points ----------------------------------------------------------------


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Sampled token ids [B] int64 for logits [B, V], on the logits' device."""
    _check_logits(logits, params)
    return _draw(_process(logits, params, inplace=False), params, None)


def sample_with_logprobs(
    logits: torch.Tensor, params: SamplingTensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ids [B] and logprobs [B, V] float32 of the processed logits.

    The logprobs follow ``executor.sampler``'s convention: after bias, min_tokens and
    penalties, before temperature and filtering.
    """
    _check_logits(logits, params)
    processed = _process(logits, params, inplace=False)
    return _draw(processed, params, None), processed.log_softmax(dim=-1)


# --- the parameters ----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SamplingTensors:
    """Per-row sampling settings as device tensors, plus host switches.

    Built by ``tessera.executor.sampling_batch.sampling_tensors`` each step, or filled
    directly by an executor that keeps persistent device buffers (a field may be a view
    of a larger buffer, with unit stride for the [B] ones). Token id lists are padded with -1.
    """

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    min_p: torch.Tensor  # [B] float32; 0 = off
    seeds: torch.Tensor  # [B] int64: the Philox key
    counters: torch.Tensor  # [B] int64: tokens generated so far (the Philox step)
    repetition_penalty: torch.Tensor  # [B] float32; 1 = off
    presence_penalty: torch.Tensor  # [B] float32; 0 = off
    frequency_penalty: torch.Tensor  # [B] float32; 0 = off
    min_tokens: torch.Tensor  # [B] int64
    blocked_token_ids: torch.Tensor  # [B, Lm] int64: blocked while counter < min_tokens
    bias_token_ids: torch.Tensor  # [B, Lb] int64
    bias_values: torch.Tensor  # [B, Lb] float32
    prompt_token_ids: torch.Tensor  # [B, Lp] int64: for the repetition penalty
    output_token_ids: torch.Tensor  # [B, Lo] int64: for all three penalties
    # Host switches, from the options only. max_top_k: largest top_k of the rows that
    # filter by top-k or top-p, or 0 when some row has top-p alone (full sort).
    all_greedy: bool = False
    do_top_k_top_p: bool = True
    max_top_k: int = 0
    do_min_p: bool = True
    do_penalties: bool = True

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


def _check_logits(logits: torch.Tensor, params: SamplingTensors) -> tuple[int, int]:
    check_tensor("logits", logits, 2, FLOAT_DTYPES, unit_last_stride=True)
    num_rows, vocab = logits.shape
    if vocab < 1:
        raise ValueError("logits have an empty vocabulary dimension")
    rows = {
        "temperature": (params.temperature, torch.float32),
        "top_k": (params.top_k, torch.int64),
        "top_p": (params.top_p, torch.float32),
        "min_p": (params.min_p, torch.float32),
        "seeds": (params.seeds, torch.int64),
        "counters": (params.counters, torch.int64),
        "repetition_penalty": (params.repetition_penalty, torch.float32),
        "presence_penalty": (params.presence_penalty, torch.float32),
        "frequency_penalty": (params.frequency_penalty, torch.float32),
        "min_tokens": (params.min_tokens, torch.int64),
    }
    for name, (t, dtype) in rows.items():
        check_tensor(name, t, 1, (dtype,), unit_last_stride=True)  # the draw reads t[row]
        if t.shape[0] != num_rows:
            raise ValueError(f"{name} has {t.shape[0]} rows, logits have {num_rows}")
    lists = {
        "blocked_token_ids": (params.blocked_token_ids, torch.int64),
        "bias_token_ids": (params.bias_token_ids, torch.int64),
        "bias_values": (params.bias_values, torch.float32),
        "prompt_token_ids": (params.prompt_token_ids, torch.int64),
        "output_token_ids": (params.output_token_ids, torch.int64),
    }
    for name, (t, dtype) in lists.items():
        check_tensor(name, t, 2, (dtype,))
        if t.shape[0] != num_rows:
            raise ValueError(f"{name} has {t.shape[0]} rows, logits have {num_rows}")
    if params.bias_values.shape != params.bias_token_ids.shape:
        raise ValueError("bias_values and bias_token_ids differ in shape")
    if params.max_top_k < 0:
        raise ValueError(f"max_top_k must be >= 0, got {params.max_top_k}")
    tensors = {name: t for name, (t, _) in (rows | lists).items()}
    check_devices(_draw_kernel, logits=logits, **tensors)
    return num_rows, vocab
