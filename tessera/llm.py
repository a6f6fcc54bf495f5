"""Offline batch API: ``LLM(model=...).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from tqdm.auto import tqdm

from tessera.common import constraints
from tessera.common.embeddings import l2_normalize
from tessera.common.executor_config import ExecutorConfig
from tessera.common.sampling_params import SamplingParams
from tessera.engine import Engine, SequenceState
from tessera.executor.model_runner import ModelRunner
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.scheduler.config import SchedulerConfig
from tessera.tokenizer_svc.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: int | None = None,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        scheduling_policy: str = "fcfs",
        device: str = "auto",
        dtype: str = "auto",
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
        async_scheduling: bool = True,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        quantization: str = "auto",
        show_progress: bool = True,
        tensor_parallel_size: int = 1,
    ) -> None:
        batched = max_num_batched_tokens or 2048
        executor_config = ExecutorConfig(
            model=model,
            device=device,
            dtype=dtype,
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory=kv_cache_memory,
            num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=batched,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            show_progress=show_progress,
            tensor_parallel_size=tensor_parallel_size,
            dist_init_method="file:///set-by-ranks" if tensor_parallel_size > 1 else "",
        )
        if tensor_parallel_size > 1:
            # Rank 0 here, the others as processes (executor.ranks); a split the model
            # refuses is an error before any of them starts.
            from tessera.common.registry import resolve_model
            from tessera.executor.parallel import check_splittable, read_model_config
            from tessera.executor.ranks import ParallelRunner

            check_splittable(read_model_config(resolve_model(model)), tensor_parallel_size)
            self.runner = ParallelRunner(executor_config)
        else:
            self.runner = ModelRunner(executor_config)
        mc = self.runner.model_config
        pool_tokens = self.runner.num_blocks * block_size
        if max_model_len is None:
            max_model_len = min(mc.max_position_embeddings, pool_tokens)
        elif max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}"
            )
        self.scheduler_config = SchedulerConfig(
            num_blocks=self.runner.num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_model_len,
            policy=scheduling_policy,
            enable_prefix_caching=enable_prefix_caching,
        )
        logger.info(
            "KV pool holds %d tokens: %.1f requests of max_model_len %d at once",
            pool_tokens,
            pool_tokens / max_model_len,
            max_model_len,
        )
        self.tokenizer = Tokenizer.load(self.runner.source)
        self.engine = Engine(
            self.runner, self.scheduler_config, self.tokenizer, async_scheduling=async_scheduling
        )
        self._ids = itertools.count()

    @property
    def model_config(self):
        return self.runner.model_config

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do at tensor_parallel_size 1)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (after writing the KV pool by hand, say); returns
        how many blocks were cached."""
        return self.engine.scheduler.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        params = self._broadcast(sampling_params, len(prompts))
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        outputs: list[RequestOutput] = []
        seq_index: dict[str, tuple[int, int]] = {}
        added: list[str] = []
        try:
            for i, (prompt, sp, prio) in enumerate(zip(prompts, params, priorities, strict=True)):
                token_ids = self._encode(prompt)
                request_id = str(next(self._ids))
                out = RequestOutput(
                    request_id, prompt if isinstance(prompt, str) else None, token_ids
                )
                outputs.append(out)
                for j in range(sp.n):
                    sid = f"{request_id}-{j}" if sp.n > 1 else request_id
                    self.engine.add_sequence(sid, token_ids, sp, priority=prio, seed_offset=j)
                    added.append(sid)
                    seq_index[sid] = (i, j)
                    out.outputs.append(CompletionOutput(j, "", [], None))
            self._run(outputs, seq_index, use_tqdm)
        except BaseException:
            self.engine.abort(added)  # nothing stays in the pool after an error
            raise
        return outputs

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        normalize: bool = True,
        use_tqdm: bool = True,
    ) -> list[list[float]]:
        """One vector per prompt (text or token ids), in input order: the mean of the
        model's final-norm hidden state over the prompt's positions, L2-normalised
        unless ``normalize`` is False. The prompts run through the same scheduler as
        generation (chunked like any prefill), and may share steps with it."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to embed")
        ids = [self._encode(p) for p in prompts]
        seq_index: dict[str, int] = {}
        try:
            for i, token_ids in enumerate(ids):
                sid = f"embd-{next(self._ids)}"
                self.engine.add_embedding(sid, token_ids)
                seq_index[sid] = i
            vectors = self._run_embeddings(seq_index, use_tqdm)
        except BaseException:
            self.engine.abort(list(seq_index))  # nothing stays in the pool after an error
            raise
        return [l2_normalize(v) for v in vectors] if normalize else vectors

    def _run_embeddings(self, seq_index: dict[str, int], use_tqdm: bool) -> list[list[float]]:
        vectors: list[list[float] | None] = [None] * len(seq_index)
        remaining = len(seq_index)
        bar = tqdm(total=remaining, desc="Embedding", disable=not use_tqdm or remaining < 2)
        try:
            while remaining:
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine stopped with requests still open")
                for seq in self.engine.step():
                    if seq.request_id in seq_index and seq.finished:
                        if seq.embedding is None:
                            raise RuntimeError(f"embedding {seq.request_id} ended without one")
                        vectors[seq_index[seq.request_id]] = seq.embedding
                        remaining -= 1
                        bar.update(1)
        finally:
            bar.close()
        return vectors  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        tok = self._require_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            for conv in conversations  # type: ignore[union-attr]
        ]
        token_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        results = self.generate(token_ids, sampling_params, use_tqdm=use_tqdm)
        for res, p in zip(results, prompts, strict=True):
            res.prompt = p
        return results

    def _run(
        self, outputs: list[RequestOutput], seq_index: dict[str, tuple[int, int]], use_tqdm: bool
    ) -> None:
        remaining = len(seq_index)
        bar = tqdm(total=remaining, desc="Generating", disable=not use_tqdm or remaining < 2)
        try:
            while remaining:
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine stopped with requests still open")
                for seq in self.engine.step():
                    if seq.request_id not in seq_index or not seq.finished:
                        continue
                    i, j = seq_index[seq.request_id]
                    outputs[i].outputs[j] = self._completion(j, seq)
                    if j == 0:
                        outputs[i].num_cached_tokens = seq.num_cached_tokens or 0
                    remaining -= 1
                    bar.update(1)
        finally:
            bar.close()
        for out in outputs:
            out.finished = True

    @staticmethod
    def _completion(index: int, seq: SequenceState) -> CompletionOutput:
        return CompletionOutput(
            index=index,
            text=seq.text,
            token_ids=seq.token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
        )

    def _broadcast(
        self, sp: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            sp = [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"{len(sp)} sampling params for {n} prompts")
        for p in sp:
            if p.constraint is not None:
                constraints.check(p.constraint)  # ConstraintError, a ValueError, if bad
        return sp

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self._require_tokenizer().encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"model {self.runner.source.name!r} has no tokenizer; "
                "pass token ids instead of text"
            )
        return self.tokenizer
