"""The executor's step loop body: mirror the scheduler's requests, run the model, sample.

``ModelRunner.execute(plan)`` applies the plan's diff to its mirror of running
requests (see ``executor.plan`` for the mirror rule), lays out the flattened batch,
runs one forward pass over the paged KV pool and samples one token for every
request that reached the end of its known tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from executor.attention import TorchAttentionBackend
from executor.config import DEFAULT_CPU_KV_CACHE_MEMORY, ExecutorConfig
from executor.model import LlamaForCausalLM
from executor.model_config import ModelConfig
from executor.plan import SamplingOptions, StepPlan, StepResult
from executor.registry import resolve_model
from executor.sampler import Sampler, SamplingBatch, compute_logprobs
from executor.triton_backend import TritonAttentionBackend, layout_step
from executor.weights import load_weights

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
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


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
        loaded = load_weights(
            self.source, dtype=self.dtype, device=self.device, progress=config.show_progress
        )
        self.model_config: ModelConfig = loaded.config
        mc = self.model_config
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.use_triton = backend == "triton"
        self.attention = TritonAttentionBackend() if self.use_triton else TorchAttentionBackend()
        self.model = LlamaForCausalLM(
            mc,
            loaded.tensors,
            self.device,
            max_positions=mc.max_position_embeddings,
            attention=self.attention,
            fused_kernels=self.use_triton,
        )
        self.sampler = Sampler()
        self.block_size = config.block_size
        self.num_blocks = self._size_kv_pool()
        shape = (self.num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.requests: dict[str, _RequestState] = {}
        max_len = min(
            config.max_model_len or mc.max_position_embeddings, self.num_blocks * self.block_size
        )
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        self.graphs = None
        if self.use_triton and self.device.type == "cuda" and config.cuda_graphs:
            from executor.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                max_batch=config.max_num_seqs,
                width=self.max_blocks_per_seq,
                block_size=self.block_size,
                device=self.device,
            )
        logger.info(
            "KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB) on %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block / 2**20,
            self.device,
        )

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return (
            2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim * elem
        )

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
        shape = (blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        caches = [
            (
                torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device),
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
        del caches, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        # peak includes the weights and the temporary caches (which the pool replaces).
        cache_bytes = blocks * self.bytes_per_block
        return int(total * self.config.gpu_memory_utilization - peak + cache_bytes)

    def execute(self, plan: StepPlan) -> StepResult:
        self._apply_diff(plan)
        if plan.is_empty:
            return StepResult()
        if self.use_triton:
            sample_ids, logits = self._forward_tensors(plan)
        else:
            sample_ids, logits = self._forward_lists(plan)
        if not sample_ids:
            return StepResult()
        states = [self.requests[r] for r in sample_ids]
        if self.use_triton:
            tokens, logprobs = self._sample_on_device(logits, states)
        else:
            batch = SamplingBatch(
                options=[s.sampling for s in states],
                prompt_token_ids=[s.prompt_token_ids for s in states],
                output_token_ids=[s.output_token_ids for s in states],
            )
            tokens, logprobs = self.sampler(logits, batch)
        result = StepResult()
        for request_id, state, token, lp in zip(sample_ids, states, tokens, logprobs, strict=True):
            state.output_token_ids.append(token)
            result.sampled_token_ids[request_id] = token
            if lp is not None:
                result.logprobs[request_id] = lp
        return result

    def _sample_on_device(self, logits: torch.Tensor, states: list[_RequestState]):
        """The Triton sampler (kernels.sampling): every row in batched device ops, one
        device-to-host copy of the tokens. Seeded draws use Philox keyed by (seed,
        tokens generated so far), so they differ from the CPU sampler's for one seed."""
        from kernels.sampling import SamplingTensors, sample, sample_with_logprobs

        options = [s.sampling for s in states]
        params = SamplingTensors.from_options(
            options,
            [len(s.output_token_ids) for s in states],
            self.device,
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
        )
        wanted = [o.logprobs for o in options]
        if all(k is None for k in wanted):
            return sample(logits, params).tolist(), [None] * len(states)
        ids, logprobs = sample_with_logprobs(logits, params)
        # log_softmax of logprobs is the same logprobs: compute_logprobs takes either.
        return ids.tolist(), compute_logprobs(logprobs, ids, wanted)

    def _scheduled(self, plan: StepPlan):
        """(request id, state, start, end) of every scheduled request, checked and advanced."""
        for request_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            end = start + n
            if end > state.num_tokens:
                raise ValueError(
                    f"request {request_id}: {n} tokens scheduled from {start} but only "
                    f"{state.num_tokens} are known"
                )
            state.num_computed_tokens = end
            yield request_id, state, start, end

    def _forward_lists(self, plan: StepPlan) -> tuple[list[str], torch.Tensor | None]:
        """The torch backend: the step laid out with Python lists."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        for request_id, state, start, end in self._scheduled(plan):
            input_ids.extend(state.token_slice(start, end))
            positions.extend(range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
            block_tables.append(state.block_ids)
            if end == state.num_tokens:
                sample_ids.append(request_id)
                sample_rows.append(len(input_ids) - 1)
        meta = self.attention.build_metadata(
            query_lens, context_lens, block_tables, self.block_size, self.device
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model.forward(ids_t, pos_t, self.kv_caches, meta)
        if not sample_ids:
            return sample_ids, None
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return sample_ids, self.model.compute_logits(hidden[rows])  # [B, V]

    def _forward_tensors(self, plan: StepPlan) -> tuple[list[str], torch.Tensor | None]:
        """The Triton backend: numpy layout, and a CUDA graph for decode-only steps."""
        num_seqs = len(plan.num_scheduled_tokens)
        query_lens = np.empty(num_seqs, dtype=np.int64)
        context_lens = np.empty(num_seqs, dtype=np.int64)
        input_ids: list[int] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        states: list[_RequestState] = []
        for i, (request_id, state, start, end) in enumerate(self._scheduled(plan)):
            input_ids.extend(state.token_slice(start, end))
            query_lens[i] = end - start
            context_lens[i] = end
            states.append(state)
            if end == state.num_tokens:
                sample_ids.append(request_id)
                sample_rows.append(len(input_ids) - 1)
        width = int(-(-context_lens.max() // self.block_size))
        table = np.zeros((num_seqs, width), dtype=np.int32)
        for i, state in enumerate(states):
            n = min(width, len(state.block_ids))
            table[i, :n] = state.block_array[:n]
        positions, slots, qsl = layout_step(query_lens, context_lens, table, self.block_size)
        ids = np.asarray(input_ids, dtype=np.int64)
        decode_only = len(ids) == num_seqs
        if (
            decode_only
            and self.graphs is not None
            and len(sample_ids) == num_seqs
            and self.graphs.can_run(num_seqs, width)
        ):
            return sample_ids, self.graphs.run(ids, positions, slots, table, context_lens)
        meta = self.attention.metadata_from_arrays(
            query_lens, context_lens, table, slots, qsl, self.device
        )
        ids_t = torch.from_numpy(ids).to(self.device)
        pos_t = torch.from_numpy(positions).to(self.device)
        hidden = self.model.forward(ids_t, pos_t, self.kv_caches, meta)
        if not sample_ids:
            return sample_ids, None
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return sample_ids, self.model.compute_logits(hidden[rows])

    def _apply_diff(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            state = _RequestState(
                prompt_token_ids=list(new.all_token_ids[: new.num_prompt_tokens]),
                output_token_ids=list(new.all_token_ids[new.num_prompt_tokens :]),
                sampling=new.sampling,
                block_ids=[],
                num_computed_tokens=new.num_computed_tokens,
            )
            state.add_blocks(list(new.block_ids))
            self.requests[new.request_id] = state
        for cached in plan.cached_requests:
            self.requests[cached.request_id].add_blocks(cached.new_block_ids)
