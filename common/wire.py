"""Protobuf on the wire, dataclasses inside: the conversions every process uses at its edge.

Torch-free. Each ``*_to_pb`` has a ``*_from_pb`` that gives back an equal dataclass, with
one exception that is a choice: the sampling floats cross the wire as float32, and
``sampling_from_pb`` reads each back as the shortest decimal that rounds to the same
float32, so a user's ``temperature=0.7`` arrives as 0.7 (not 0.699999988) and the
executor applies what the user asked for. Logprobs are float32 already and come back
bit for bit.

``decode`` is the only way bytes from a socket become a message: it accepts exactly
what ``encode`` of that message type produces and raises ``WireError`` on anything
else (a pickle, another message type, fields this version does not know). Nothing is
ever unpickled.

Dependencies still flow scheduler -> executor: the stop conditions are the scheduler's
type, imported only by ``stop_from_pb``, which only the scheduler calls.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from tessera.common.constraints import Constraint
from tessera.common.plan import (
    CachedRequestData,
    NewRequestData,
    SamplingOptions,
    StepPlan,
    StepResult,
    StopConditions,
    TokenLogprobs,
)
from tessera.common.sampling_fields import ENGINE
from tessera.proto.tessera.v1 import engine_pb2

M = TypeVar("M", bound=Message)


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""


# -- bytes ---------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    return msg.SerializeToString()


def decode(cls: type[M], data: bytes) -> M:
    """Parse ``data`` as a ``cls`` message, or raise WireError.

    Strict: after dropping unknown fields the message must re-encode to exactly as
    many bytes as came in. Every process of a deployment runs the same version, so an
    unknown field means garbage or a version mismatch, never something to skip.
    """
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise WireError(f"not a {cls.DESCRIPTOR.name} message ({len(data)} bytes): {e}") from e
    msg.DiscardUnknownFields()
    if msg.ByteSize() != len(data):
        raise WireError(
            f"not a {cls.DESCRIPTOR.name} message ({len(data)} bytes): "
            "it carries fields this version does not know"
        )
    return msg


# -- sampling and stops ----------------------------------------------------------


def sampling_to_pb(options: SamplingOptions) -> engine_pb2.SamplingOptions:
    pb = engine_pb2.SamplingOptions(
        min_tokens_blocked_ids=options.min_tokens_blocked_ids,
        logit_bias_ids=[token for token, _ in options.logit_bias],
        logit_bias_values=[bias for _, bias in options.logit_bias],
    )
    for spec in ENGINE:  # the scalar fields, declared in common/sampling_fields.py
        value = getattr(options, spec.name)
        if value is not None:
            setattr(pb, spec.name, value)
    if options.constraint is not None:
        constraint_to_pb(options.constraint, pb.constraint)
    return pb


def constraint_to_pb(constraint: Constraint, pb) -> None:
    """Fill ``pb`` (engine Constraint, or any message with the same oneof) from it."""
    if constraint.kind == "json_object":
        pb.json_object = True
    elif constraint.kind == "choice":
        pb.choice.choices.extend(json.loads(constraint.spec))
    else:
        setattr(pb, constraint.kind, constraint.spec)


def constraint_from_pb(pb, oneof: str = "kind") -> Constraint | None:
    """The Constraint a message's oneof holds; None if unset. WireError if malformed."""
    kind = pb.WhichOneof(oneof)
    if kind is None:
        return None
    try:
        if kind == "json_object":
            return Constraint("json_object") if pb.json_object else None
        if kind == "choice":
            return Constraint.choice(list(pb.choice.choices))
        return Constraint(kind, getattr(pb, kind))
    except ValueError as e:
        raise WireError(f"constraint: {e}") from e


def sampling_from_pb(pb: engine_pb2.SamplingOptions) -> SamplingOptions:
    if len(pb.logit_bias_ids) != len(pb.logit_bias_values):
        raise WireError(
            f"SamplingOptions: {len(pb.logit_bias_ids)} logit_bias_ids but "
            f"{len(pb.logit_bias_values)} logit_bias_values"
        )
    scalars = {}
    for spec in ENGINE:
        value = getattr(pb, spec.name)
        if spec.optional and not pb.HasField(spec.name):
            value = None
        elif spec.type is float:
            value = _decimal(value)
        scalars[spec.name] = value
    return SamplingOptions(
        **scalars,
        constraint=constraint_from_pb(pb.constraint) if pb.HasField("constraint") else None,
        min_tokens_blocked_ids=tuple(pb.min_tokens_blocked_ids),
        logit_bias=tuple(
            (token, _decimal(bias))
            for token, bias in zip(pb.logit_bias_ids, pb.logit_bias_values, strict=True)
        ),
    )


def stop_to_pb(stop: StopConditions) -> engine_pb2.StopConditions:
    """Everything but the EOS ids, which the scheduler takes from the model."""
    return engine_pb2.StopConditions(
        max_tokens=stop.max_tokens,
        min_tokens=stop.min_tokens,
        stop_token_ids=stop.stop_token_ids,
        ignore_eos=stop.ignore_eos,
    )


def stop_from_pb(
    pb: engine_pb2.StopConditions,
    eos_token_ids: Sequence[int] = (),
    default_max_tokens: int | None = None,
) -> StopConditions:
    """``max_tokens`` 0 (unset) means ``default_max_tokens`` where one is given.

    Raises ValueError (from StopConditions) if the limits contradict each other.
    """
    max_tokens = pb.max_tokens
    if max_tokens == 0 and default_max_tokens is not None:
        max_tokens = default_max_tokens
    return StopConditions(
        max_tokens=max_tokens,
        min_tokens=pb.min_tokens,
        stop_token_ids=tuple(pb.stop_token_ids),
        eos_token_ids=tuple(eos_token_ids),
        ignore_eos=pb.ignore_eos,
    )


# -- logprobs --------------------------------------------------------------------


def logprobs_to_pb(logprobs: TokenLogprobs) -> engine_pb2.TokenLogprob:
    return engine_pb2.TokenLogprob(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        rank=logprobs.rank,
        top_ids=[token for token, _ in logprobs.top],
        top_logprobs=[logprob for _, logprob in logprobs.top],
    )


def logprobs_from_pb(pb: engine_pb2.TokenLogprob) -> TokenLogprobs:
    if len(pb.top_ids) != len(pb.top_logprobs):
        raise WireError(
            f"TokenLogprob: {len(pb.top_ids)} top_ids but {len(pb.top_logprobs)} top_logprobs"
        )
    return TokenLogprobs(
        token_id=pb.token_id,
        logprob=pb.logprob,
        rank=pb.rank,
        top=tuple(zip(pb.top_ids, pb.top_logprobs, strict=True)),
    )


# -- the step --------------------------------------------------------------------


def plan_to_pb(plan: StepPlan, step_id: int) -> engine_pb2.StepPlan:
    return engine_pb2.StepPlan(
        step_id=step_id,
        new_requests=[
            engine_pb2.NewRequestData(
                request_id=new.request_id,
                all_token_ids=new.all_token_ids,
                num_prompt_tokens=new.num_prompt_tokens,
                sampling=_sampling_pb(new.sampling),
                block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens,
                embed=new.embed,
            )
            for new in plan.new_requests
        ],
        # As dicts, which the constructor reads faster than messages it would copy.
        cached_requests=[
            {"request_id": cached.request_id, "new_block_ids": cached.new_block_ids}
            for cached in plan.cached_requests
        ],
        scheduled_ids=list(plan.num_scheduled_tokens),
        num_scheduled_tokens=list(plan.num_scheduled_tokens.values()),
        finished_request_ids=plan.finished_request_ids,
    )


# SamplingOptions object id -> (the object, its message), for plan_to_pb: see _sampling_pb.
_sampling_pbs: dict[int, tuple[SamplingOptions, engine_pb2.SamplingOptions]] = {}


def _sampling_pb(options: SamplingOptions) -> engine_pb2.SamplingOptions:
    """sampling_to_pb, once per SamplingOptions object: requests share a few (the
    scheduler caches them by their message, scheduler/messages.py), and a plan carries
    each new request's. Keyed by identity, so equal options that are not the same
    (0.0 and -0.0) keep their own message; the entry holds the object, so its id is
    not reused while it is there. The caller copies the message, never changes it."""
    entry = _sampling_pbs.get(id(options))
    if entry is not None and entry[0] is options:
        return entry[1]
    if len(_sampling_pbs) >= 256:
        _sampling_pbs.clear()
    pb = sampling_to_pb(options)
    _sampling_pbs[id(options)] = (options, pb)
    return pb


def plan_from_pb(pb: engine_pb2.StepPlan) -> StepPlan:
    """The plan (its step id is ``pb.step_id``); WireError if the batch lists disagree."""
    if len(pb.scheduled_ids) != len(pb.num_scheduled_tokens):
        raise WireError(
            f"StepPlan {pb.step_id}: {len(pb.scheduled_ids)} scheduled_ids but "
            f"{len(pb.num_scheduled_tokens)} num_scheduled_tokens"
        )
    num_scheduled_tokens = dict(zip(pb.scheduled_ids, pb.num_scheduled_tokens, strict=True))
    if len(num_scheduled_tokens) != len(pb.scheduled_ids):
        raise WireError(f"StepPlan {pb.step_id}: a request is scheduled twice")
    return StepPlan(
        new_requests=[
            NewRequestData(
                request_id=new.request_id,
                all_token_ids=list(new.all_token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                sampling=sampling_from_pb(new.sampling),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                embed=new.embed,
            )
            for new in pb.new_requests
        ],
        cached_requests=[
            CachedRequestData(cached.request_id, list(cached.new_block_ids))
            for cached in pb.cached_requests
        ],
        num_scheduled_tokens=num_scheduled_tokens,
        finished_request_ids=list(pb.finished_request_ids),
    )


def result_to_pb(result: StepResult, step_id: int) -> engine_pb2.StepResult:
    pb = engine_pb2.StepResult(
        step_id=step_id,
        sampled_ids=list(result.sampled_token_ids),
        sampled_token_ids=list(result.sampled_token_ids.values()),
    )
    for request_id, logprobs in result.logprobs.items():
        pb.logprobs[request_id].CopyFrom(logprobs_to_pb(logprobs))
    for request_id, vector in result.embeddings.items():
        pb.embeddings[request_id].values.extend(vector)
    return pb


def result_from_pb(pb: engine_pb2.StepResult) -> StepResult:
    """The sampled tokens (``pb.step_id`` and ``pb.error`` are the caller's to check)."""
    if len(pb.sampled_ids) != len(pb.sampled_token_ids):
        raise WireError(
            f"StepResult {pb.step_id}: {len(pb.sampled_ids)} sampled_ids but "
            f"{len(pb.sampled_token_ids)} sampled_token_ids"
        )
    # Slices: lists copied out of the repeated fields faster than zip reads them.
    sampled = dict(zip(pb.sampled_ids[:], pb.sampled_token_ids[:], strict=True))
    if len(sampled) != len(pb.sampled_ids):
        raise WireError(f"StepResult {pb.step_id}: a request has two sampled tokens")
    result = StepResult(sampled_token_ids=sampled)
    if pb.logprobs:  # (maps looked at only when there is something in them)
        unknown = set(pb.logprobs) - sampled.keys()
        if unknown:
            raise WireError(f"StepResult {pb.step_id}: logprobs for unsampled {sorted(unknown)}")
        result.logprobs = {rid: logprobs_from_pb(lp) for rid, lp in pb.logprobs.items()}
    if pb.embeddings:
        both = sampled.keys() & set(pb.embeddings)
        if both:
            raise WireError(
                f"StepResult {pb.step_id}: a token and an embedding for {sorted(both)}"
            )
        result.embeddings = {rid: list(e.values) for rid, e in pb.embeddings.items()}
    return result


# -- a step's outputs, as columns ----------------------------------------------------

# finish_reason (SequenceOutput's words; "" while running) <-> TokenColumns' FinishReason
FINISH_CODES = {
    "": engine_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": engine_pb2.FINISH_REASON_STOP,
    "length": engine_pb2.FINISH_REASON_LENGTH,
    "abort": engine_pb2.FINISH_REASON_ABORT,
    "error": engine_pb2.FINISH_REASON_ERROR,
}
_FINISH_NAMES = {code: name for name, code in FINISH_CODES.items()}
_STOP = engine_pb2.FINISH_REASON_STOP
_ERROR = engine_pb2.FINISH_REASON_ERROR


# The output of a sequence that runs on with one new token and nothing else to report
# (no logprobs, no queue time, not finished), the row nearly every running sequence
# gives every step: (new token id, num prompt tokens, num output tokens, num cached
# tokens), keyed by request id (Scheduler.update_from_result's token_rows).
TokenRow = tuple[int, int, int, int]


class TokenColumnsBuilder:
    """Outputs of sequences in, one ``TokenColumns`` out (engine.proto).

    ``add`` costs a tuple and a few appends, and ``add_token_rows`` takes a whole step's
    running rows at once, so the scheduler can queue 256 outputs a step without a
    protobuf object each; ``to_pb`` turns the rows into columns at once.
    """

    __slots__ = ("rows", "token_ids", "stop_token_ids", "errors", "error_kinds",
                 "queue_rows", "queue_seconds", "logprob_rows", "logprobs",
                 "embedding_rows", "embeddings", "embedding_size", "token_rows")  # fmt: skip

    def __init__(self) -> None:
        # (request_id, num_new_tokens, finish code, num_prompt, num_output, num_cached)
        self.rows: list[tuple[str, int, int, int, int, int]] = []
        self.token_ids: list[int] = []
        self.stop_token_ids: list[int] = []
        self.errors: list[str] = []
        self.error_kinds: list[str] = []
        self.queue_rows: list[int] = []
        self.queue_seconds: list[float] = []
        self.logprob_rows: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.embedding_rows: list[int] = []
        self.embeddings: list[float] = []
        self.embedding_size = 0  # of every vector in these columns
        # Running rows added whole (add_token_rows), after the rows above in the columns.
        self.token_rows: list[Mapping[str, TokenRow]] = []

    def __len__(self) -> int:
        return len(self.rows) + sum(map(len, self.token_rows))

    def add(
        self,
        request_id: str,
        new_token_ids: list[int],
        finish_reason: str = "",
        num_prompt_tokens: int = 0,
        num_output_tokens: int = 0,
        num_cached_tokens: int = 0,
        stop_token_id: int | None = None,
        queue_seconds: float = 0.0,
        error: str = "",
        error_kind: str = "",
        logprobs: Sequence[TokenLogprobs] = (),
        embedding: Sequence[float] | None = None,
    ) -> None:
        """One sequence's output. ``stop_token_id`` is required with "stop", unless the
        row carries an embed sequence's ``embedding`` (only with "stop", every vector of
        one length); ``error`` and ``error_kind`` are kept with "error" only;
        ``logprobs``: none, or one per new token. ValueError otherwise."""
        code = FINISH_CODES.get(finish_reason)
        if code is None:
            raise ValueError(f"finish_reason {finish_reason!r} is not one of {list(FINISH_CODES)}")
        if embedding is not None:
            if code != _STOP or not embedding:
                raise ValueError(f"request {request_id!r}: an embedding ends a row with stop")
            if self.embedding_size and len(embedding) != self.embedding_size:
                raise ValueError(
                    f"request {request_id!r}: an embedding of {len(embedding)} floats "
                    f"beside ones of {self.embedding_size}"
                )
        row = len(self.rows)
        self.rows.append((request_id, len(new_token_ids), code, num_prompt_tokens,
                          num_output_tokens, num_cached_tokens))  # fmt: skip
        self.token_ids += new_token_ids
        if embedding is not None:
            self.embedding_size = len(embedding)
            self.embedding_rows.append(row)
            self.embeddings += embedding
        elif code == _STOP:
            if stop_token_id is None:
                raise ValueError(f"request {request_id!r} stopped without a stop token id")
            self.stop_token_ids.append(stop_token_id)
        elif code == _ERROR:
            self.errors.append(error)
            self.error_kinds.append(error_kind)
        if queue_seconds:
            self.queue_rows.append(row)
            self.queue_seconds.append(queue_seconds)
        if logprobs:
            if len(logprobs) != len(new_token_ids):
                raise ValueError(
                    f"request {request_id!r}: {len(logprobs)} logprobs for "
                    f"{len(new_token_ids)} new tokens"
                )
            self.logprob_rows.append(row)
            self.logprobs += logprobs

    def add_tokens(
        self,
        request_id: str,
        new_token_ids: list[int],
        num_prompt_tokens: int,
        num_output_tokens: int,
        num_cached_tokens: int,
    ) -> None:
        """add() for the common row: a sequence that runs on, with no logprobs and no
        queue time to report."""
        self.rows.append((request_id, len(new_token_ids), 0, num_prompt_tokens,
                          num_output_tokens, num_cached_tokens))  # fmt: skip
        self.token_ids += new_token_ids

    def add_token_rows(self, rows: Mapping[str, TokenRow]) -> None:
        """Many running rows at once, in their order: add_tokens for each (one new
        token), without a call each. They come after every row ``add`` and
        ``add_tokens`` queue, before or after this call; ``rows`` is kept, not copied:
        leave it unchanged from now on."""
        if rows:
            self.token_rows.append(rows)

    def fields(self) -> dict[str, Sequence]:
        """The TokenColumns fields that are not empty: ``TokenColumns(**fields())``, or
        ``EngineOutputs(tokens=fields())``, which builds it in place (no copy)."""
        columns = zip(*self.rows, strict=True) if self.rows else [()] * 6
        ids, counts, codes, prompts, outputs, cached = columns
        token_ids = self.token_ids
        if self.token_rows:  # the columns of add() rows, then those of each mapping
            ids, counts, codes, prompts, outputs, cached = (
                list(ids), list(counts), list(codes), list(prompts), list(outputs), list(cached)
            )  # fmt: skip
            token_ids = list(token_ids)
            for rows in self.token_rows:
                # (strict=False: TokenRow tuples all have four items; a check costs a third)
                new_token_ids, num_prompt, num_output, num_cached = zip(
                    *rows.values(), strict=False
                )
                ids += rows
                counts += [1] * len(rows)
                codes += [engine_pb2.FINISH_REASON_UNSPECIFIED] * len(rows)
                token_ids += new_token_ids
                prompts += num_prompt
                outputs += num_output
                cached += num_cached
        fields = {
            "request_ids": ids,
            "num_new_tokens": counts,
            "new_token_ids": token_ids,
            "finish_reasons": codes,
            "num_prompt_tokens": prompts,
            "num_output_tokens": outputs,
            "num_cached_tokens": cached,
            "stop_token_ids": self.stop_token_ids,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "queue_rows": self.queue_rows,
            "queue_seconds": self.queue_seconds,
            "logprob_rows": self.logprob_rows,
            "logprobs": [logprobs_to_pb(lp) for lp in self.logprobs],
            "embedding_rows": self.embedding_rows,
            "embeddings": self.embeddings,
        }
        return {name: values for name, values in fields.items() if values}

    def to_pb(self) -> engine_pb2.TokenColumns:
        return engine_pb2.TokenColumns(**self.fields())


def output_rows(out: engine_pb2.EngineOutputs) -> list[OutputRow]:
    """The per-sequence view of ``out.tokens``, row by row; WireError if its columns
    disagree (lengths, counts, finish reasons, sparse rows)."""
    cols = out.tokens
    num_rows = len(cols.request_ids)
    for name in ("num_new_tokens", "finish_reasons", "num_prompt_tokens",
                 "num_output_tokens", "num_cached_tokens"):  # fmt: skip
        if len(getattr(cols, name)) != num_rows:
            raise WireError(
                f"TokenColumns: {len(getattr(cols, name))} {name} for {num_rows} request_ids"
            )
    counts = list(cols.num_new_tokens)
    if sum(counts) != len(cols.new_token_ids):
        raise WireError(
            f"TokenColumns: num_new_tokens add up to {sum(counts)}, but "
            f"{len(cols.new_token_ids)} new_token_ids came"
        )
    reasons = []
    for code in cols.finish_reasons:
        name = _FINISH_NAMES.get(code)
        if name is None:
            raise WireError(f"TokenColumns: {code} is not a FinishReason")
        reasons.append(name)
    embedding_rows = _sparse_rows(cols.embedding_rows, num_rows, "embedding_rows")
    if any(reasons[row] != "stop" for row in embedding_rows):
        raise WireError("TokenColumns: an embedding row must finish with stop")
    size = len(cols.embeddings) // len(embedding_rows) if embedding_rows else 0
    if size * len(embedding_rows) != len(cols.embeddings) or (embedding_rows and not size):
        raise WireError(
            f"TokenColumns: {len(cols.embeddings)} embedding floats for "
            f"{len(embedding_rows)} embedding rows of one length"
        )
    embedding_at = {row: i * size for i, row in enumerate(embedding_rows)}
    num_stops = reasons.count("stop") - len(embedding_rows)
    num_errors = reasons.count("error")
    if len(cols.stop_token_ids) != num_stops:
        raise WireError(
            f"TokenColumns: {len(cols.stop_token_ids)} stop_token_ids for {num_stops} "
            "stopped rows"
        )
    if not len(cols.errors) == len(cols.error_kinds) == num_errors:
        raise WireError(
            f"TokenColumns: {len(cols.errors)} errors and {len(cols.error_kinds)} "
            f"error_kinds for {num_errors} failed rows"
        )
    queue = dict(zip(_sparse_rows(cols.queue_rows, num_rows, "queue_rows"),
                     _same_length(cols.queue_seconds, cols.queue_rows, "queue_seconds"),
                     strict=True))  # fmt: skip
    logprob_rows = _sparse_rows(cols.logprob_rows, num_rows, "logprob_rows")
    num_logprobs = sum(counts[row] for row in logprob_rows)
    if num_logprobs != len(cols.logprobs):
        raise WireError(
            f"TokenColumns: {len(cols.logprobs)} logprobs for the {num_logprobs} new "
            "tokens of the logprob_rows"
        )
    for lp in cols.logprobs:
        if len(lp.top_ids) != len(lp.top_logprobs):
            raise WireError(
                f"TokenLogprob: {len(lp.top_ids)} top_ids but {len(lp.top_logprobs)} "
                "top_logprobs"
            )
    with_logprobs = set(logprob_rows)

    outputs = []
    # Lists once (a repeated field's item costs a lookup and a new object each read).
    token_ids, logprobs = cols.new_token_ids[:], cols.logprobs
    prompts, generated = cols.num_prompt_tokens[:], cols.num_output_tokens[:]
    cached = cols.num_cached_tokens[:]
    special = set(embedding_rows) | with_logprobs  # rows that need more than the plain
    start = next_logprob = next_stop = next_error = 0
    for row, request_id in enumerate(cols.request_ids[:]):
        end = start + counts[row]
        reason = reasons[row]
        seq = OutputRow(request_id, token_ids[start:end], bool(reason), reason, prompts[row],
                        generated[row], cached[row], queue.get(row, 0.0))  # fmt: skip
        start = end
        outputs.append(seq)
        if not reason and row not in special:
            continue  # the common row: a running sequence's tokens, nothing else
        if row in with_logprobs:
            seq.new_logprobs = logprobs[next_logprob : next_logprob + counts[row]]
            next_logprob += counts[row]
        if row in embedding_at:
            at = embedding_at[row]
            seq.embedding = cols.embeddings[at : at + size]
        elif reason == "stop":
            seq.stop_token_id = cols.stop_token_ids[next_stop]
            next_stop += 1
        elif reason == "error":
            seq.error = cols.errors[next_error]
            seq.error_kind = cols.error_kinds[next_error]
            next_error += 1
    return outputs


def sequence_outputs(out: engine_pb2.EngineOutputs) -> list[engine_pb2.SequenceOutput]:
    """``output_rows``, each as the SequenceOutput message that carried it once."""
    return [row.to_pb() for row in output_rows(out)]


@dataclass(slots=True)
class OutputRow:
    """One sequence's output of one step: a row of a TokenColumns message, with the
    fields of engine.proto's SequenceOutput (``stop_token_id`` None where the message
    leaves it unset). A plain object: the gateway reads every field of a few hundred of
    these a step, and merges a stream's queued ones, which messages make slow."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""  # "stop", "length", "abort" or "error" when finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queue_seconds: float = 0.0
    new_logprobs: Sequence[engine_pb2.TokenLogprob] = ()
    stop_token_id: int | None = None
    error: str = ""
    error_kind: str = ""
    embedding: Sequence[float] = ()

    def to_pb(self) -> engine_pb2.SequenceOutput:
        seq = engine_pb2.SequenceOutput(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids,
            new_logprobs=self.new_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            error=self.error,
            error_kind=self.error_kind,
            num_cached_tokens=self.num_cached_tokens,
            queue_seconds=self.queue_seconds,
            embedding=self.embedding,
        )
        if self.stop_token_id is not None:
            seq.stop_token_id = self.stop_token_id
        return seq


def _sparse_rows(rows: Sequence[int], num_rows: int, name: str) -> list[int]:
    """``rows``, checked to be ascending row numbers below ``num_rows``."""
    rows = list(rows)
    for previous, row in zip([-1, *rows], rows, strict=False):
        if not previous < row < num_rows:
            raise WireError(f"TokenColumns: {name} must be ascending rows below {num_rows}")
    return rows


def _same_length(values: Sequence, rows: Sequence[int], name: str) -> Sequence:
    if len(values) != len(rows):
        raise WireError(f"TokenColumns: {len(values)} {name} for {len(rows)} rows")
    return values


# -- helpers ---------------------------------------------------------------------

_F32 = struct.Struct("<f")
_F32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]  # the largest finite float32


def _decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``value``."""
    target = _F32.pack(value)
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        candidate = float(f"{value:.{digits}g}")
        # A short decimal of a float32 near its largest rounds past it: not this one.
        if abs(candidate) <= _F32_MAX and _F32.pack(candidate) == target:
            return candidate
    return value  # inf or nan
