"""Gateway messages to domain types and back, checked: an ``AddSequence`` becomes a
``Request`` (or a ValueError naming what is wrong). Pure functions; the scheduler process
calls them at its edge, so nothing a gateway sends can fail a step. (Outputs go back as
columns: sessions.py and common/wire.py's TokenColumnsBuilder.)"""

from __future__ import annotations

import functools
import math

from tessera.common.plan import SamplingOptions, StopConditions, check_cache_salt
from tessera.common.sampling_fields import check_all
from tessera.common.wire import sampling_from_pb, stop_from_pb
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.request import Request


def request_from_pb(seq: engine_pb2.AddSequence, info: engine_pb2.EngineInfo) -> Request:
    """The domain request, or ValueError saying what is wrong with it."""
    request_id = seq.request_id
    if not request_id:
        raise ValueError("a sequence has no request_id")
    vocab = info.vocab_size
    prompt = seq.prompt_token_ids[:]  # a list: a slice copies faster than list()
    if prompt and max(prompt) >= vocab:  # max() first: a Python loop only for the message
        bad = [t for t in prompt if t >= vocab]
        raise ValueError(
            f"request {request_id!r}: prompt token ids {bad[:5]} are outside the "
            f"vocabulary [0, {vocab})"
        )
    if seq.embed:
        return _embed_request(seq, prompt)
    resumed = seq.resume_output_token_ids[:]
    if resumed and max(resumed) >= vocab:
        bad = [t for t in resumed if t >= vocab]
        raise ValueError(
            f"request {request_id!r}: resumed output token ids {bad[:5]} are outside the "
            f"vocabulary [0, {vocab})"
        )
    try:
        sampling = _checked_sampling(
            seq.sampling.SerializeToString() if seq.HasField("sampling") else None, vocab
        )
        # max_tokens unset (0) means the room the prompt leaves: only then is it a key
        room = max(info.max_model_len - len(prompt), 1) if seq.stop.max_tokens == 0 else 0
        stop = _cached_stop(seq.stop.SerializeToString(), tuple(info.eos_token_ids), room)
        cache_salt = check_cache_salt(seq.cache_salt)
        if resumed and (
            len(resumed) >= stop.max_tokens or len(prompt) + len(resumed) >= info.max_model_len
        ):
            raise ValueError(
                f"{len(resumed)} resumed output tokens leave nothing to generate within "
                f"max_tokens={stop.max_tokens} and max_model_len={info.max_model_len}"
            )
    except ValueError as e:
        raise ValueError(f"request {request_id!r}: {e}") from None
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=sampling,
        stop=stop,
        priority=seq.priority,
        cache_salt=cache_salt,
        # Resumed from a lost replica: recomputed like a preempted request's outputs.
        output_token_ids=resumed,
    )


def _checked_sampling(data: bytes | None, vocab_size: int) -> SamplingOptions:
    """The options of a SamplingOptions message's bytes (None: no message, the
    defaults), checked; ValueError if they are malformed or out of range.

    Most requests carry one of a few settings (the defaults, a client's own), so the
    answer is cached by the bytes: SamplingOptions is frozen, and requests share one.
    A large message (a long grammar) is converted each time, not kept."""
    if data is not None and len(data) > _MAX_CACHED_SAMPLING_BYTES:
        return _convert_sampling(data, vocab_size)
    return _cached_sampling(data, vocab_size)


def _convert_sampling(data: bytes | None, vocab_size: int) -> SamplingOptions:
    if data is None:
        options = SamplingOptions()
    else:
        options = sampling_from_pb(engine_pb2.SamplingOptions.FromString(data))
    check_sampling(options, vocab_size)
    return options


_MAX_CACHED_SAMPLING_BYTES = 1024
_cached_sampling = functools.lru_cache(maxsize=256)(_convert_sampling)


@functools.lru_cache(maxsize=256)
def _cached_stop(data: bytes, eos_token_ids: tuple[int, ...], room: int) -> StopConditions:
    """The stop conditions of a StopConditions message's bytes, with the model's EOS ids
    and, for a message without max_tokens, the room the prompt leaves; ValueError if
    they contradict each other. Cached like the sampling options (StopConditions is
    frozen too): requests carry a few settings."""
    pb = engine_pb2.StopConditions.FromString(data)
    return stop_from_pb(pb, eos_token_ids, default_max_tokens=room or None)


def _embed_request(seq: engine_pb2.AddSequence, prompt: list[int]) -> Request:
    """An embed sequence: a prompt and nothing to generate (request.py explains the
    max_tokens of 1); any generation setting is a mistake of the sender."""
    if seq.HasField("sampling") or seq.HasField("stop") or seq.resume_output_token_ids:
        raise ValueError(
            f"request {seq.request_id!r}: an embed sequence takes no sampling, stop or "
            "resumed outputs"
        )
    try:
        cache_salt = check_cache_salt(seq.cache_salt)
    except ValueError as e:
        raise ValueError(f"request {seq.request_id!r}: {e}") from None
    return Request(
        request_id=seq.request_id,
        prompt_token_ids=prompt,
        sampling=SamplingOptions(),
        stop=StopConditions(max_tokens=1),
        priority=seq.priority,
        cache_salt=cache_salt,
        embed=True,
    )


def check_sampling(s: SamplingOptions, vocab_size: int) -> None:
    """ValueError unless the executor can apply these options (the gateway checks the
    public limits; this keeps a bad message from failing a whole step)."""
    check_all(s)  # the declared ranges (common/sampling_fields.py)
    checks = [
        (s.top_k <= vocab_size, f"top_k must be at most the vocabulary size {vocab_size}"),
        (
            s.logprobs is None or s.logprobs <= vocab_size,
            f"logprobs must be at most the vocabulary size {vocab_size}",
        ),
        (
            all(t < vocab_size for t in s.min_tokens_blocked_ids),
            "min_tokens_blocked_ids must be token ids of the vocabulary",
        ),
        (
            all(t < vocab_size and math.isfinite(b) for t, b in s.logit_bias),
            "logit_bias must map token ids of the vocabulary to finite biases",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
