"""In-process engine: one scheduler driving one model runner, plus detokenization.

The loop reads like the serving processes do: ``add_request`` -> ``step`` (schedule,
execute, update) -> per-request updates. When the runner overlaps (the tensor path:
its submit returns before the GPU is done), each step schedules and submits the next
plan before it collects the one in flight, so the scheduler's bookkeeping and the
next step's layout run on the host while the GPU works (scheduler.scheduler explains
the pending tokens this leaves). Stop strings are matched on the detokenized
text (``tokenizer_svc.text_stream``); a match aborts the request in the scheduler
(freeing its blocks at once) and reports finish reason "stop".

``add_embedding`` queues an embed request (scheduler.request): its prompt's prefill
shares the steps with the generating requests and it ends with its pooled vector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tessera.common.plan import (
    SamplingOptions,
    StepPlan,
    StepResult,
    StopConditions,
    TokenLogprobs,
)
from tessera.common.sampling_params import SamplingParams
from tessera.executor.model_runner import ModelRunner, Step
from tessera.scheduler.config import SchedulerConfig
from tessera.scheduler.request import Request
from tessera.scheduler.scheduler import Scheduler
from tessera.tokenizer_svc.text_stream import TextStream
from tessera.tokenizer_svc.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SequenceState:
    """What the engine has streamed so far for one sequence (one of a request's n)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: TextStream | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    embedding: list[float] | None = None  # an embed request's vector, once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler_config: SchedulerConfig,
        tokenizer: Tokenizer | None,
        async_scheduling: bool = True,
    ) -> None:
        self.runner = runner
        self.scheduler = Scheduler(scheduler_config)
        self.tokenizer = tokenizer
        self.config = scheduler_config
        self.eos_token_ids = runner.model_config.eos_token_ids
        self.sequences: dict[str, SequenceState] = {}
        # Plan the next step while one runs: only where the runner's submit returns
        # before the step is done. May be switched between steps (benchmarks).
        self.pipelined = async_scheduling and runner.overlaps
        self._in_flight: tuple[StepPlan, Step] | None = None  # submitted, not collected

    def add_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        seed_offset: int = 0,
    ) -> None:
        vocab = self.runner.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        num_prompt = len(prompt_token_ids)
        max_tokens = params.effective_max_tokens(num_prompt, self.config.max_model_len)
        stop = StopConditions(
            max_tokens=max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=tuple(params.stop_token_ids),
            eos_token_ids=self.eos_token_ids,
            ignore_eos=params.ignore_eos,
        )
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=params.to_options(self.eos_token_ids, seed_offset),
            stop=stop,
            priority=priority,
        )
        self.scheduler.add_request(request)  # raises RequestRejected (a ValueError)
        stream = None
        if self.tokenizer is not None:
            stream = TextStream(
                self.tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            )
        self.sequences[request_id] = SequenceState(
            request_id, list(prompt_token_ids), params, stream
        )

    def add_embedding(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """Queue an embed request: its prompt's mean final hidden state, no tokens."""
        vocab = self.runner.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=1),
            embed=True,
        )
        self.scheduler.add_request(request)  # raises RequestRejected (a ValueError)
        self.sequences[request_id] = SequenceState(
            request_id, list(prompt_token_ids), SamplingParams(), None
        )

    def abort(self, request_ids: list[str]) -> list[SequenceState]:
        self.scheduler.abort_requests(request_ids)
        done = []
        for rid in request_ids:
            seq = self.sequences.pop(rid, None)
            if seq is not None and not seq.finished:
                seq.finish_reason = "abort"
                done.append(seq)
        return done

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[SequenceState]:
        """Run one step; return the sequences that changed (finished ones included)."""
        if self._in_flight is None:
            self._in_flight = self._submit_next()
            if self._in_flight is None:
                return []
        plan, step = self._in_flight
        # Pipelined: the next plan goes in while `step` runs on the device.
        self._in_flight = self._submit_next() if self.pipelined else None
        return self._update(plan, self.runner.collect(step))

    def _submit_next(self) -> tuple[StepPlan, Step] | None:
        plan = self.scheduler.schedule()
        return None if plan.is_empty else (plan, self.runner.submit(plan))

    def _update(self, plan: StepPlan, result: StepResult) -> list[SequenceState]:
        outputs = self.scheduler.update_from_result(plan, result)
        changed = []
        for out in outputs:
            seq = self.sequences.get(out.request_id)
            if seq is None:
                continue
            if seq.num_cached_tokens is None:  # the first output: set at admission
                seq.num_cached_tokens = out.num_cached_tokens
            if out.embedding is not None:
                seq.embedding = out.embedding
            self._append(seq, out.new_token_ids, out.new_logprobs)
            if not seq.finished and out.finished:
                seq.finish_reason = out.finish_reason
                seq.stop_reason = out.stop_token_id
                if seq.stream is not None:
                    seq.stream.finish()
                    if seq.stream.matched_stop is not None:  # in the held-back tail
                        seq.stop_reason = seq.stream.matched_stop
            if seq.finished:
                if not out.finished:  # a stop string matched: free the request now
                    self.scheduler.abort_requests([seq.request_id])
                del self.sequences[seq.request_id]
            changed.append(seq)
        return changed

    def _append(
        self, seq: SequenceState, token_ids: list[int], logprobs: list[TokenLogprobs]
    ) -> None:
        seq.token_ids.extend(token_ids)
        seq.logprobs.extend(logprobs)
        if seq.stream is None:
            return
        seq.stream.push(token_ids)
        if seq.stream.matched_stop is not None:
            seq.finish_reason = "stop"
            seq.stop_reason = seq.stream.matched_stop
