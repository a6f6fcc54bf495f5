"""CUDA graphs for decode steps: one captured forward (and lm head) per batch size.

A decode step launches a few hundred small kernels; replaying a graph launches them
all at once, so the GPU never waits for Python between them. Graphs are captured
for batch sizes 1, 2, 4, 8 and every multiple of 8 up to ``max_batch``, largest
first so that every graph shares one memory pool. A step of ``b`` rows replays the
smallest graph of at least ``b`` rows; the extra rows are padding that the kernels
skip (slot -1: nothing written; context length 0: a zero output).

Everything a graph reads lives in static device buffers that ``run`` fills before
each replay: input ids, positions, slot mapping, block tables (``width`` columns,
enough for the longest context) and context lengths. The decode kernel's number of
KV splits is fixed per graph, chosen from the batch size so that small batches
still fill the GPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tessera.executor.transfer import to_device
from tessera.executor.triton_backend import TritonAttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        width: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.width = width
        self.block_size = block_size
        self.device = device
        m = self.max_batch
        self.input_ids = torch.zeros(m, dtype=torch.int64, device=device)
        self.positions = torch.zeros(m, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((m,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(m, width, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(m, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(m + 1, dtype=torch.int32, device=device)
        props = torch.cuda.get_device_properties(device)
        self.num_sms = props.multi_processor_count
        self.num_kv_heads = kv_caches[0][0].shape[2]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(device)
        # The buffers above were filled on the current stream; the warm-ups below run on
        # another one and must not read them (a slot of -1, a context of 0) before that.
        stream.wait_stream(torch.cuda.current_stream(device))
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            with torch.cuda.stream(stream):
                self._step(bs, kv_caches, meta)  # warm-up: compile and autotune outside
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self._step(bs, kv_caches, meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.graphs),
            self.max_batch,
            time.perf_counter() - start,
        )

    def num_splits(self, batch: int) -> int:
        """KV splits per sequence: enough programs for about two waves of the GPU."""
        programs = batch * self.num_kv_heads
        wanted = -(-2 * self.num_sms // programs)
        # Each split should cover at least 256 tokens of the longest context.
        most = max(1, self.width * self.block_size // 256)
        return max(1, min(wanted, most))

    def _meta(self, bs: int) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            num_tokens=bs,
            decode_only=True,
            num_splits=self.num_splits(bs),
        )

    @torch.inference_mode()
    def _step(self, bs: int, kv_caches, meta: TritonAttentionMetadata) -> torch.Tensor:
        hidden = self.model.forward(self.input_ids[:bs], self.positions[:bs], kv_caches, meta)
        return self.model.compute_logits(hidden)

    def can_run(self, batch: int, width: int) -> bool:
        return batch <= self.max_batch and width <= self.width

    @torch.inference_mode()
    def run(
        self,
        input_ids: np.ndarray,  # [b] int64
        positions: np.ndarray,  # [b] int64
        slot_mapping: np.ndarray,  # [b] int64
        block_tables: np.ndarray,  # [b, w] int32, w <= width
        context_lens: np.ndarray,  # [b]
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # logits [b, V]
        """Fill the buffers and replay. pending: (row indices, token ids), both on the
        device, written over input_ids: tokens an earlier step sampled, not yet on the
        host. Every copy is asynchronous, so the host does not wait for the step before.
        """
        b = len(input_ids)
        bs = next(s for s in self.sizes if s >= b)
        # One pinned staging copy for the four [bs] vectors: ids, positions, slots, ctx.
        staged = np.zeros((4, bs), dtype=np.int64)
        staged[0, :b] = input_ids
        staged[1, :b] = positions
        staged[2, :] = -1
        staged[2, :b] = slot_mapping
        staged[3, :b] = context_lens
        vectors = to_device(staged, self.device)
        self.input_ids[:bs].copy_(vectors[0])
        if pending is not None:
            self.input_ids.index_copy_(0, *pending)
        self.positions[:bs].copy_(vectors[1])
        self.slot_mapping[:bs].copy_(vectors[2])
        self.context_lens[:bs].copy_(vectors[3])
        # Only the columns in use: the kernels read no block past a row's context, and
        # padding rows have context 0, so what stays from earlier steps is never read.
        w = block_tables.shape[1]
        self.block_tables[:b, :w].copy_(to_device(block_tables, self.device))
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:b]
