"""Grammar state of constrained requests, on the executor, where the logits are.

DESIGN. A request with a constraint (``SamplingOptions.constraint``, see
``common/constraints.py``) gets a matcher (llguidance ``LLMatcher``) when the executor
first mirrors it. The matcher reads every token the request samples, in order, and gives
the bitmask of tokens allowed next; ``kernels.bitmask`` sets the others' logits to -inf
before sampling, for the constrained rows of the batch only.

- Why here, not in the scheduler: the executor appends the tokens it samples itself (the
  mirror rule, ``common/plan.py``), so it can advance a matcher without a round trip,
  and the scheduler stays free of vocabularies and torch.
- Async scheduling: step N+1 of a constrained request needs N's token on the host to
  compute its mask, but its forward does not (pending inputs are filled in on the
  device). So on the tensor path ``submit`` launches N+1's forward first, then collects
  step N (as for rows with penalties), advances the matchers and computes the masks
  while the GPU runs that forward; only the sampling of N+1 waits for the masks. What a
  constrained batch still gives up is the host time of step N+1's sampling launch after
  the masks, and the masks themselves where they take longer than the forward.
- Recovery and preemption: a request re-sent after a preemption or to a restarted
  executor arrives as a new request whose ``all_token_ids`` hold the outputs so far;
  ``start`` replays them into a fresh matcher, so the grammar state is rebuilt from the
  tokens already streamed.
- The end: when the grammar accepts and nothing more may follow, the mask allows only the
  model's EOS ids, so the request ends on EOS and the scheduler reports "stop". A matcher
  that errs (a token it refused, or llguidance's per-step fuel limit) allows only EOS too.

The vocabulary (llguidance's ``LLTokenizer`` over the model's own tokenizer) is built
once, on the first constrained request, in that step. Built in a thread at executor
start it held the GIL through the first steps after a restart, and on 2 cores the
scheduler then went silent past the gateway's timeout; the lock keeps one build.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

import numpy as np

from tessera.common.constraints import Constraint, ConstraintError, to_grammar
from tessera.common.registry import ModelSource

logger = logging.getLogger(__name__)


@lru_cache(maxsize=256)
def _grammar(constraint: Constraint) -> str:
    return to_grammar(constraint)


class Grammars:
    """Matchers for one model's vocabulary; ``vocab_size``: the logits' width."""

    def __init__(
        self, source: ModelSource, vocab_size: int, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        self.source = source
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self._tokenizer = None
        self._eos_ids: tuple[int, ...] = eos_token_ids  # the tokenizer's, once it is read
        self._lock = threading.Lock()

    def _vocabulary(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                from tessera.tokenizer_svc.tokenizer import Tokenizer

                tokenizer = Tokenizer.load(self.source)
                if tokenizer is None:
                    raise ConstraintError(
                        f"model {self.source.name!r} has no tokenizer, so no constraint"
                    )
                self._eos_ids = tokenizer.eos_token_ids or self._eos_ids
                self._tokenizer = llguidance.LLTokenizer(
                    tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=list(self._eos_ids) or None,
                )
            return self._tokenizer

    def start(self, constraint: Constraint, output_token_ids: list[int]):
        """A matcher for ``constraint`` that has read ``output_token_ids`` (a replay)."""
        import llguidance

        try:
            grammar = _grammar(constraint)
            vocabulary = self._vocabulary()
        except ConstraintError as e:  # the gateway checks first; an offline caller may not
            logger.warning("constraint refused, the request may only end: %s", e)
            return _Refused()
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        if matcher.is_error():
            logger.warning("constraint failed to compile: %s", matcher.get_error())
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            logger.warning("replayed tokens left the grammar: %s", matcher.get_error())
        return matcher

    @staticmethod
    def advance(matcher, token_id: int) -> None:
        if not matcher.is_stopped():
            matcher.consume_token(token_id)

    def bitmask(self, matchers: list) -> np.ndarray:
        """[len(matchers), ceil(V / 32)] int32: each matcher's allowed next tokens, each
        written by llguidance straight into its row (no bytes object per row).

        One row after another, in this thread: llguidance's thread pool (LLExecutor) was
        measured in place of this loop and was slower (8B shape on the H100, every
        request constrained: 0.88 of unconstrained throughput against 0.89 at batch 64,
        0.72 against 0.80 at 256; benchmarks/RESULTS.md)."""
        out = np.zeros((len(matchers), self.num_words), dtype=np.int32)
        for row, matcher in enumerate(matchers):
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(out[row].ctypes.data, self.num_words * 4)
            if matcher.is_error() or not out[row].any():
                self._allow_only_eos(out[row])
        return out

    def _allow_only_eos(self, row: np.ndarray) -> None:
        if not any(eos < self.vocab_size for eos in self._eos_ids):
            row[:] = -1  # no EOS to end on: a row of -inf logits would sample garbage
            return
        view = row.view(np.uint32)
        for eos in self._eos_ids:
            if eos < self.vocab_size:
                view[eos // 32] |= np.uint32(1 << (eos % 32))


class _Refused:
    """The matcher of a constraint that failed to compile: it allows only EOS."""

    def is_error(self) -> bool:
        return True

    def is_stopped(self) -> bool:
        return True
