"""The executor's step loop body: mirror the scheduler's requests, run the model, sample.

``ModelRunner.execute(plan)`` applies the plan's diff to its mirror of running
requests (see ``executor.plan`` for the mirror rule), lays out the flattened batch,
runs one forward pass over the paged KV pool and samples one token for every
request that reached the end of its known tokens.

``execute`` is ``collect(submit(plan))``. On the tensor path (Triton, CUDA) the two
halves come apart so the host never holds the GPU up: ``submit`` launches the step
and returns at once, its sampled tokens still on the device; the caller may submit
the next plan before it collects this one. A request whose next input is such a
pending token gets it on the device, gathered from the earlier step's sampled ids,
so the host waits for nothing while it lays out step N+1 during step N. ``collect``
then waits for the step and appends its tokens on the host, in submission order.
Penalties read a request's output history on the host, and a grammar needs the last
token for its mask: for a row with either and a pending token, ``submit`` collects the
earlier step once this step's forward is launched, so the wait overlaps the forward and
only the sampling waits. The torch path (the CPU) runs everything in ``submit``.

An embed request (NewRequestData.embed) samples nothing: each step that runs a chunk
of its prompt adds the chunk's final-norm hidden states (float32) to the request's
running sum, and the step of its last prompt position returns sum / prompt length in
StepResult.embeddings. The sum lives in the request's mirror state, so a request that
is forgotten (finished, preempted) or an executor that restarts starts it afresh. Steps
with embed rows never replay a CUDA graph (graphs return logits, not hidden states).
"""

from __future__ import annotations

import logging
import math
import mmap
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.common.executor_config import DEFAULT_CPU_KV_CACHE_MEMORY, ExecutorConfig
from tessera.common.model_config import ModelConfig
from tessera.common.plan import SamplingOptions, StepPlan, StepResult
from tessera.common.registry import resolve_model
from tessera.executor import cpu_attention
from tessera.executor.attention import TorchAttentionBackend
from tessera.executor.grammar import Grammars
from tessera.executor.models import model_class
from tessera.executor.parallel import (
    TensorShard,
    check_splittable,
    init_group,
    local_heads,
    read_model_config,
)
from tessera.executor.sampler import (
    LogprobTensors,
    Sampler,
    SamplingBatch,
    logprob_tensors,
    logprobs_to_host,
)
from tessera.executor.sampling_batch import check_option
from tessera.executor.transfer import to_device, to_host_async
from tessera.executor.triton_backend import TritonAttentionBackend, layout_step
from tessera.executor.weights import load_weights

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestState:
    # Kept apart so the sampler reads both every step without copying them.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingOptions
    block_ids: list[int]
    num_computed_tokens: int
    # The block ids again as int32, for the kernels' block tables (grown by doubling).
    block_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # Tokens sampled by submitted, uncollected steps, in order: (step, row of its
    # sampled ids). They follow output_token_ids; collect() moves them there.
    pending: deque[tuple[Step, int]] = field(default_factory=deque)
    # The constrained request's grammar state (executor.grammar), advanced per token.
    grammar: object | None = None
    # An embed request: the sum of its prompt positions' final hidden states so far,
    # [H] float32 on the device (None before its first chunk).
    embed: bool = False
    pooled_sum: torch.Tensor | None = None

    def add_blocks(self, block_ids: list[int]) -> None:
        start = len(self.block_ids)
        self.block_ids.extend(block_ids)
        if len(self.block_ids) > len(self.block_array):
            grown = np.zeros(max(16, 2 * len(self.block_ids)), dtype=np.int32)
            grown[:start] = self.block_array[:start]
            self.block_array = grown
        self.block_array[start : len(self.block_ids)] = block_ids

    @property
    def num_tokens(self) -> int:
        """Tokens known on the host (pending ones not counted)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]


@dataclass(slots=True, eq=False)
class Step:
    """One submitted step. Its tokens may still be on the device until collected."""

    sample_ids: list[str] = field(default_factory=list)  # requests that sample, in row order
    states: list[_RequestState] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [B] int64 on the device: the next step's inputs
    # The tokens and logprob tensors (executor.sampler.LogprobTensors), copied to pinned
    # host memory as the step's last work, so collect() waits for this step only and
    # not for one submitted after it.
    host_tokens: torch.Tensor | None = None
    host_logprobs: LogprobTensors | None = None
    wanted: list[int | None] = field(default_factory=list)
    # Embed requests that finished this step, and their vectors [E, H] in pinned memory.
    embed_ids: list[str] = field(default_factory=list)
    host_embeddings: torch.Tensor | None = None
    done: torch.cuda.Event | None = None  # recorded after the copies (CUDA)
    result: StepResult | None = None  # set once collected

    @property
    def collected(self) -> bool:
        return self.result is not None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), but on the CPU mapped from anonymous memory, which the OS hands
    out zero-filled page by page on first touch: a pool of 2 GiB costs no start-up time
    (torch.zeros writes every byte: 1 s on an idle 2-core machine, 6 s on a busy one) and
    no memory until blocks are used. Zeros, not torch.empty: a NaN in a slot that no
    token wrote would still reach outputs through masked attention (0 * NaN = NaN)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    # Private: a forked child gets its own copy on write, as with malloc'd memory.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)  # keeps buf alive


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class ModelRunner:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.source = resolve_model(config.model)
        shard = None
        if config.tensor_parallel_size > 1:  # checked before this rank joins the group
            shape = read_model_config(self.source)
            check_splittable(shape, config.tensor_parallel_size)
            shard = TensorShard(shape, config.tensor_parallel_rank, config.tensor_parallel_size)
        # Tensor parallel: rank 0 alone samples; the others take its tokens (see submit).
        self.group, self.device = init_group(
            config.tensor_parallel_rank,
            config.tensor_parallel_size,
            config.dist_init_method,
            self.device,
        )
        loaded = load_weights(
            self.source,
            dtype=self.dtype,
            device=self.device,
            progress=config.show_progress,
            shard=shard,
            quantization=config.quantization,
        )
        self.model_config: ModelConfig = loaded.config
        mc = self.model_config
        self.num_kv_heads = local_heads(mc, self.group)[1]  # this rank's
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.use_triton = backend == "triton"
        self.kv_dtype = self.dtype
        if config.kv_cache_dtype == "fp8":
            if not self.use_triton:
                raise ValueError(
                    "kv_cache_dtype fp8 needs the Triton attention backend "
                    "(attention_backend triton, the default on CUDA)"
                )
            self.kv_dtype = torch.float8_e4m3fn
        if self.use_triton:
            self.attention = TritonAttentionBackend()
        else:
            # On the CPU with a float32 pool, decodes read the blocks in place (numba).
            fused = (
                self.device.type == "cpu"
                and self.kv_dtype == torch.float32
                and cpu_attention.available()
            )
            self.attention = TorchAttentionBackend(fused_decode=fused)
            if fused:
                cpu_attention.warm_up()
        self.model = model_class(mc)(
            mc,
            loaded.tensors,
            self.device,
            max_positions=mc.max_position_embeddings,
            attention=self.attention,
            fused_kernels=self.use_triton,
            group=self.group,
        )
        self.sampler = Sampler()
        self.grammars = Grammars(self.source, mc.vocab_size, tuple(mc.eos_token_ids))
        # The constraint vocabulary is built on the first constrained request, not here:
        # built in a thread at start-up it held the GIL through the first steps after an
        # executor restart, and on 2 cores the scheduler went silent past the gateway's
        # timeout (tests/services/test_failures.py).
        self.block_size = config.block_size
        self.num_blocks = self.group.min_int(self._size_kv_pool())  # the smallest rank's
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        self.kv_caches = [
            (
                zeroed_pool(shape, self.kv_dtype, self.device),
                zeroed_pool(shape, self.kv_dtype, self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.requests: dict[str, _RequestState] = {}
        self._uncollected: deque[Step] = deque()  # submitted, in order
        max_len = min(
            config.max_model_len or mc.max_position_embeddings, self.num_blocks * self.block_size
        )
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        self.graphs = None
        if self.use_triton and self.device.type == "cuda" and config.cuda_graphs:
            from tessera.executor.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                max_batch=config.max_num_seqs,
                width=self.max_blocks_per_seq,
                block_size=self.block_size,
                device=self.device,
            )
        logger.info(
            "KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB, %s) on %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block / 2**20,
            str(self.kv_dtype).removeprefix("torch."),
            self.device,
        )

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * mc.num_hidden_layers * self.block_size * self.num_kv_heads * mc.head_dim * elem

    def _size_kv_pool(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._profile_free_cuda_memory()
        else:
            budget = self.config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"no room for a single KV block ({self.bytes_per_block} bytes) in "
                f"{budget} bytes; raise kv_cache_memory / gpu_memory_utilization"
            )
        return int(num_blocks)

    def _profile_free_cuda_memory(self) -> int:
        """Run the worst-case step once and return the bytes left for the KV pool."""
        mc = self.model_config
        n = self.config.max_num_batched_tokens
        blocks = -(-n // self.block_size)
        shape = (blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        caches = [
            (
                torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                torch.empty(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        meta = self.attention.build_metadata(
            [n], [n], [list(range(blocks))], self.block_size, self.device
        )
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        hidden = self.model.forward(ids, torch.arange(n, device=self.device), caches, meta)
        num_rows = min(self.config.max_num_seqs, n)
        self.model.compute_logits(hidden[:num_rows]).float().log_softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        short = 17
        if self.use_triton and n > short:
            # A short prompt takes the prefill kernel's small-tile variant (see
            # kernels.paged_prefill._prefill_config): compile it now, not while the
            # first short request waits.
            table = list(range(-(-short // self.block_size)))
            meta = self.attention.build_metadata(
                [short], [short], [table], self.block_size, self.device
            )
            self.model.forward(ids[:short], torch.arange(short, device=self.device), caches, meta)
        del caches, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        # peak includes the weights and the temporary caches (which the pool replaces).
        cache_bytes = blocks * self.bytes_per_block
        return int(total * self.config.gpu_memory_utilization - peak + cache_bytes)

    @property
    def overlaps(self) -> bool:
        """Whether submit() returns before the step is done (the tensor path), so a
        caller gains by submitting the next plan before collecting this one."""
        return self.use_triton

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.submit(plan))

    def submit(self, plan: StepPlan) -> Step:
        """Apply the plan's diff and launch the step; collect() gives its result."""
        self._apply_diff(plan)
        step = Step()
        if plan.is_empty:
            step.result = StepResult()
            return step
        if not self.use_triton:
            self._run_lists(plan, step)
            return step
        sample_ids, states, logits, pooled = self._forward_tensors(plan)
        # After the launch: the forward takes pending inputs on the device, only the
        # mask and the penalties need the tokens on the host, so the host waits for step
        # N and computes N+1's masks while the GPU runs N+1's forward.
        self._collect_pending_for_penalties(plan)
        step.sample_ids, step.states = sample_ids, states
        if not sample_ids:
            step.result = StepResult(embeddings=_vectors_to_host(pooled))
            return step
        logprobs = self._sample_on_device(logits, step)
        if pooled:
            step.embed_ids = list(pooled)
            step.host_embeddings = to_host_async(torch.stack(list(pooled.values())))
        step.host_tokens = to_host_async(step.tokens)
        if logprobs is not None:
            step.host_logprobs = tuple(to_host_async(t) for t in logprobs)
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        for row, state in enumerate(states):
            state.pending.append((step, row))
        self._uncollected.append(step)
        return step

    def is_done(self, step: Step) -> bool:
        """Whether collect(step) would return without waiting for the device."""
        return step.collected or step.done is None or step.done.query()

    def collect(self, step: Step) -> StepResult:
        """The step's result: waits for it (and every step submitted before it)."""
        while not step.collected:
            self._finish(self._uncollected.popleft())
        return step.result

    def _finish(self, step: Step) -> None:
        if step.done is not None:
            step.done.synchronize()  # this step's copies, not the steps queued behind it
        tokens = step.host_tokens.tolist()
        logprobs = logprobs_to_host(step.host_logprobs, step.wanted)
        result = StepResult()
        if step.host_embeddings is not None:
            result.embeddings = dict(
                zip(step.embed_ids, step.host_embeddings.tolist(), strict=True)
            )
        for request_id, state, token, lp in zip(
            step.sample_ids, step.states, tokens, logprobs, strict=True
        ):
            done, _ = state.pending.popleft()
            assert done is step, "steps collected out of order"
            state.output_token_ids.append(token)
            if state.grammar is not None:
                Grammars.advance(state.grammar, token)
            result.sampled_token_ids[request_id] = token
            if lp is not None:
                result.logprobs[request_id] = lp
        step.tokens = step.host_tokens = step.host_logprobs = step.host_embeddings = None
        step.result = result

    def _collect_pending_for_penalties(self, plan: StepPlan) -> None:
        """Penalties count a request's outputs on the host, and a grammar needs the last
        token for its next mask (executor/grammar.py): collect the steps whose tokens such
        a request still waits for. Called once this step's forward is queued, so the
        wait and the masks overlap the forward; only the sampling waits."""
        for request_id in plan.num_scheduled_tokens:
            state = self.requests[request_id]
            if state.pending and (state.sampling.has_penalty or state.grammar is not None):
                self.collect(state.pending[-1][0])

    def _run_lists(self, plan: StepPlan, step: Step) -> None:
        """The torch path: forward and CPU sampler, all at once."""
        sample_ids, logits, pooled = self._forward_lists(plan)
        result = StepResult(embeddings=_vectors_to_host(pooled))
        step.result = result
        if not sample_ids:
            return
        states = [self.requests[r] for r in sample_ids]
        if self.group.rank == 0:
            self._apply_grammars(logits, states)
            batch = SamplingBatch(
                options=[s.sampling for s in states],
                prompt_token_ids=[s.prompt_token_ids for s in states],
                output_token_ids=[s.output_token_ids for s in states],
            )
            tokens, logprobs = self.sampler(logits, batch)
        else:
            tokens, logprobs = [0] * len(states), [None] * len(states)
        if self.group.is_parallel:  # rank 0's draw, on every rank
            tokens = self.group.broadcast(torch.tensor(tokens, dtype=torch.int64)).tolist()
        for request_id, state, token, lp in zip(sample_ids, states, tokens, logprobs, strict=True):
            state.output_token_ids.append(token)
            if state.grammar is not None:
                Grammars.advance(state.grammar, token)
            result.sampled_token_ids[request_id] = token
            if lp is not None:
                result.logprobs[request_id] = lp

    def _sample_on_device(self, logits: torch.Tensor, step: Step) -> LogprobTensors | None:
        """The Triton sampler (kernels.sampling): every row in batched device ops; sets
        step.tokens (still on the device) and returns the logprob tensors, if any row
        asked for logprobs. Seeded draws use Philox keyed by (seed, tokens generated
        so far), so they differ from the CPU sampler's."""
        from tessera.executor.sampling_batch import sampling_tensors
        from tessera.kernels.sampling import sample, sample_with_logprobs

        states = step.states
        if self.group.rank != 0:  # rank 0 samples; this rank takes its tokens
            step.wanted = [None] * len(states)
            step.tokens = torch.empty(len(states), dtype=torch.int64, device=self.device)
            self.group.broadcast(step.tokens)
            return None
        self._apply_grammars(logits, states)
        options = [s.sampling for s in states]
        params = sampling_tensors(
            options,
            [len(s.output_token_ids) + len(s.pending) for s in states],
            self.device,
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            checked=True,  # each request's, once, when it came (_apply_diff)
        )
        step.wanted = [o.logprobs for o in options]
        if all(k is None for k in step.wanted):
            step.tokens = self.group.broadcast(sample(logits, params))
            return None
        step.tokens, logprobs = sample_with_logprobs(logits, params)
        self.group.broadcast(step.tokens)
        # log_softmax of logprobs is the same logprobs: logprob_tensors takes either.
        return logprob_tensors(logprobs, step.tokens, step.wanted)

    def _apply_grammars(self, logits: torch.Tensor, states: list[_RequestState]) -> None:
        """Forbid, in the rows of constrained requests, the tokens their grammar forbids
        (logits: [B, V], in place; the Triton kernel on the device, torch on the CPU)."""
        rows = [i for i, s in enumerate(states) if s.grammar is not None]
        if not rows:
            return
        bitmask = self.grammars.bitmask([states[i].grammar for i in rows])  # [R, W] int32
        row_ids = to_device(np.asarray(rows, dtype=np.int64), self.device)
        words = to_device(bitmask, self.device)
        from tessera.kernels.bitmask import apply_token_bitmask_, apply_token_bitmask_ref_

        apply = apply_token_bitmask_ if self.use_triton else apply_token_bitmask_ref_
        with torch.inference_mode():  # the logits are inference tensors, changed in place
            apply(logits, words, row_ids)

    def _scheduled(self, plan: StepPlan):
        """(request id, state, start, end) of every scheduled request, checked and advanced.

        end may reach into the request's pending tokens (the pipelined case)."""
        for request_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            end = start + n
            if end > state.num_tokens + len(state.pending):
                raise ValueError(
                    f"request {request_id}: {n} tokens scheduled from {start} but only "
                    f"{state.num_tokens + len(state.pending)} are known"
                )
            state.num_computed_tokens = end
            yield request_id, state, start, end

    def _forward_lists(
        self, plan: StepPlan
    ) -> tuple[list[str], torch.Tensor | None, dict[str, torch.Tensor]]:
        """The torch backend: the step laid out with Python lists. Returns the requests
        that sample, their logits [B, V], and the vectors of embed requests done."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        spans: list[tuple[str, _RequestState, int, int]] = []  # embed rows [a, b)
        for request_id, state, start, end in self._scheduled(plan):
            if state.embed:
                spans.append((request_id, state, len(input_ids), len(input_ids) + end - start))
            input_ids.extend(state.token_slice(start, end))
            positions.extend(range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
            block_tables.append(state.block_ids)
            if end == state.num_tokens and not state.embed:
                sample_ids.append(request_id)
                sample_rows.append(len(input_ids) - 1)
        meta = self.attention.build_metadata(
            query_lens, context_lens, block_tables, self.block_size, self.device
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model.forward(ids_t, pos_t, self.kv_caches, meta)
        pooled = self._pool(hidden, spans)
        if not sample_ids:
            return sample_ids, None, pooled
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return sample_ids, self.model.compute_logits(hidden[rows]), pooled  # [B, V]

    def _forward_tensors(
        self, plan: StepPlan
    ) -> tuple[list[str], list[_RequestState], torch.Tensor | None, dict[str, torch.Tensor]]:
        """The Triton backend: numpy layout, and a CUDA graph for decode-only steps.

        Returns the requests that sample, their states, their logits [B, V], and the
        vectors of embed requests done. Inputs that are pending tokens are filled in on
        the device (see the module docstring).
        """
        num_seqs = len(plan.num_scheduled_tokens)
        query_lens = np.empty(num_seqs, dtype=np.int64)
        context_lens = np.empty(num_seqs, dtype=np.int64)
        input_ids: list[int] = []
        sample_ids: list[str] = []
        sample_states: list[_RequestState] = []
        sample_rows: list[int] = []
        states: list[_RequestState] = []
        # Pending inputs: flat index in input_ids -> (step, row of its sampled ids)
        pending_dst: list[int] = []
        pending_src: list[tuple[Step, int]] = []
        spans: list[tuple[str, _RequestState, int, int]] = []  # embed rows [a, b)
        for i, (request_id, state, start, end) in enumerate(self._scheduled(plan)):
            known = state.num_tokens
            if state.embed:  # never pending: its prompt is all known
                spans.append((request_id, state, len(input_ids), len(input_ids) + end - start))
            input_ids.extend(state.token_slice(start, min(end, known)))
            for position in range(max(start, known), end):
                pending_dst.append(len(input_ids))
                pending_src.append(state.pending[position - known])
                input_ids.append(0)  # filled in on the device
            query_lens[i] = end - start
            context_lens[i] = end
            states.append(state)
            if end == known + len(state.pending) and not state.embed:
                sample_ids.append(request_id)
                sample_states.append(state)
                sample_rows.append(len(input_ids) - 1)
        width = int(-(-context_lens.max() // self.block_size))
        table = np.zeros((num_seqs, width), dtype=np.int32)
        for i, state in enumerate(states):
            n = min(width, len(state.block_ids))
            table[i, :n] = state.block_array[:n]
        positions, slots, qsl = layout_step(query_lens, context_lens, table, self.block_size)
        ids = np.asarray(input_ids, dtype=np.int64)
        pending = self._pending_inputs(pending_dst, pending_src)
        decode_only = len(ids) == num_seqs
        if (
            decode_only
            and not spans  # a graph gives logits, and an embed row needs hidden states
            and self.graphs is not None
            and len(sample_ids) == num_seqs
            and self.graphs.can_run(num_seqs, width)
        ):
            logits = self.graphs.run(ids, positions, slots, table, context_lens, pending)
            return sample_ids, sample_states, logits, {}
        meta = self.attention.metadata_from_arrays(
            query_lens, context_lens, table, slots, qsl, self.device
        )
        ids_t = to_device(ids, self.device)
        if pending is not None:
            ids_t.index_copy_(0, *pending)
        pos_t = to_device(positions, self.device)
        hidden = self.model.forward(ids_t, pos_t, self.kv_caches, meta)
        pooled = self._pool(hidden, spans)
        if not sample_ids:
            return sample_ids, sample_states, None, pooled
        rows = to_device(np.asarray(sample_rows, dtype=np.int64), self.device)
        return sample_ids, sample_states, self.model.compute_logits(hidden[rows]), pooled

    def _pool(
        self, hidden: torch.Tensor, spans: list[tuple[str, _RequestState, int, int]]
    ) -> dict[str, torch.Tensor]:
        """Add each embed request's rows [a, b) of ``hidden`` ([T, H], after the final
        norm) to its running sum; return the mean [H] (float32, on the device) of those
        whose last prompt position ran. Rank 0 alone pools: it returns the vectors."""
        done: dict[str, torch.Tensor] = {}
        if not spans or self.group.rank != 0:
            return done
        for request_id, state, a, b in spans:
            chunk = hidden[a:b].float().sum(dim=0)  # [H]
            state.pooled_sum = chunk if state.pooled_sum is None else state.pooled_sum + chunk
            if state.num_computed_tokens == state.num_tokens:
                done[request_id] = state.pooled_sum / state.num_tokens
                state.pooled_sum = None
        return done

    def _pending_inputs(
        self, dst: list[int], src: list[tuple[Step, int]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat input indices, token ids on the device) for inputs still pending."""
        if not dst:
            return None
        values = []
        start = 0
        while start < len(src):  # a run per step (one step, unless the caller ran ahead)
            step = src[start][0]
            end = start
            while end < len(src) and src[end][0] is step:
                end += 1
            rows = np.asarray([r for _, r in src[start:end]], dtype=np.int64)
            values.append(step.tokens.index_select(0, to_device(rows, self.device)))
            start = end
        index = to_device(np.asarray(dst, dtype=np.int64), self.device)
        return index, values[0] if len(values) == 1 else torch.cat(values)

    def _apply_diff(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            # Checked here, once, rather than in every step's sampling_tensors.
            check_option(new.sampling, self.model_config.vocab_size)
            state = _RequestState(
                prompt_token_ids=list(new.all_token_ids[: new.num_prompt_tokens]),
                output_token_ids=list(new.all_token_ids[new.num_prompt_tokens :]),
                sampling=new.sampling,
                block_ids=[],
                num_computed_tokens=new.num_computed_tokens,
            )
            state.add_blocks(list(new.block_ids))
            if new.embed:
                if new.num_computed_tokens or state.output_token_ids:
                    raise ValueError(
                        f"request {new.request_id}: an embed request must start at its "
                        "first prompt token, with no outputs"
                    )
                state.embed = True
            if new.sampling.constraint is not None and self.group.rank == 0:
                # a replay after a preemption or a restart: the outputs so far
                state.grammar = self.grammars.start(
                    new.sampling.constraint, state.output_token_ids
                )
            self.requests[new.request_id] = state
        for cached in plan.cached_requests:
            self.requests[cached.request_id].add_blocks(cached.new_block_ids)


def _vectors_to_host(vectors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Pooled device vectors as float lists (waits for the device: steps without a
    sampled row only, whose result is read at once anyway)."""
    if not vectors:
        return {}
    rows = torch.stack(list(vectors.values())).cpu().tolist()
    return dict(zip(vectors, rows, strict=True))
