"""The gateway's transport-neutral core, shared by the gRPC and the OpenAI HTTP fronts.

A front turns its wire request into a ``GenerationRequest`` (domain types only) and
calls ``ServingCore.open``, which admits it (model name, open-request limit), tokenizes
the prompt, validates it against the engine, and hands its n sequences to the scheduler.
The returned ``Generation`` yields ``Delta``s: new tokens, text (incremental
detokenization and exact stop strings through ``TextStream``), logprobs, the finish
reason, and the usage on the request's last delta. ``Generation.close`` must run on
every exit (done, cancelled, client gone): it aborts what still runs, so the sequences'
KV blocks are freed within one scheduler step.

    gRPC servicer ──┐                       ┌─► TokenizerClient (tokenize, chat template)
                    ├─► ServingCore.open ───┤
    OpenAI HTTP ────┘      │ Generation     └─► EngineClient.add (ZeroMQ to the scheduler)
                           ▼
                     deltas() ◄── per-step OutputRows, TextStream per sequence

A request's ``cache_salt`` (its tenant's prefix-cache namespace) is checked here and
travels on every AddSequence to the scheduler, whose prefix cache must key blocks by it.

Errors are ``RequestError``s with an ``ErrorKind``; each front maps the kind to its own
status (a gRPC code, an HTTP status), so both agree on what is the client's fault.

``ServingCore.embed`` serves embeddings through the same engine link: each input is one
AddSequence with ``embed`` set, all of a call's inputs in one AddRequests (admitted whole
or not at all), and the scheduler runs their prompts in the same batches as the
generating sequences (scheduler/request.py), answering each with its vector.

Limits (issue 5): ``sampling_params`` bounds n, stop strings (count and length),
stop_token_ids and logit_bias; ``open`` refuses at once, as UNAVAILABLE, while the engine
client counts the scheduler as lost, and a request that cannot be sent to it (not
connected, not reading) is UNAVAILABLE too, never a hang.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tessera.common import constraints
from tessera.common.constraints import Constraint
from tessera.common.embeddings import l2_normalize
from tessera.common.plan import SamplingOptions, TokenLogprobs, check_cache_salt
from tessera.common.request_fields import chat_role
from tessera.common.sampling_params import SamplingParams
from tessera.common.wire import OutputRow, logprobs_from_pb, sampling_to_pb
from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.engine_client import EngineClient, EngineUnavailable
from tessera.services.metrics import Metrics, RequestTimes
from tessera.tokenizer_svc.client import TokenizerClient, TokenizerInputError, TokenizerUnavailable
from tessera.tokenizer_svc.text_stream import TextStream
from tessera.tokenizer_svc.tokenizer import Tokenizer

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TEMPERATURE = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024  # entries of one logit_bias
MAX_STOP_TOKEN_IDS = 256
MAX_EMBED_INPUTS = 256  # inputs of one embeddings call


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the client's input is wrong; retrying it will not help
    UNKNOWN_MODEL = "unknown_model"  # a model this gateway does not serve
    OVERLOADED = "overloaded"  # too many open requests, or the scheduler's queue is full
    UNAVAILABLE = "unavailable"  # the scheduler or every tokenizer replica did not answer
    INTERNAL = "internal"  # the engine failed the request

# The scheduler's words (engine.proto: Rejection.kind, SequenceOutput.error_kind).
_REJECTION_KINDS = {"overloaded": ErrorKind.OVERLOADED, "unavailable": ErrorKind.UNAVAILABLE}
_ERROR_KINDS = {"unavailable": ErrorKind.UNAVAILABLE, "internal": ErrorKind.INTERNAL}


class RequestError(Exception):
    """A request that cannot be served, with a message the client can act on."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param  # the offending request field, where one is to blame


# -- domain types ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TextPrompt:
    text: str  # tokenized without a chat template, BOS added where the model uses one


@dataclass(slots=True, frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) turns
    add_generation_prompt: bool = True
    tools_json: str = ""  # tools for the template, OpenAI's JSON list; "": none
    # (tool_calls_json, tool_call_id) of each turn, aligned with messages; (): none has any
    tool_fields: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True, frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]


Prompt = TextPrompt | ChatPrompt | TokenPrompt


@dataclass(slots=True)
class GenerationRequest:
    prompt: Prompt | None
    params: SamplingParams
    request_id: str = ""  # unique among the open requests; assigned when empty
    model: str = ""  # empty: the served model
    priority: int = 0
    cache_salt: str = ""  # the tenant's prefix-cache namespace (scheduler/request.py)


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all n sequences
    # Prompt tokens the prefix cache served when the first sequence was admitted.
    cached_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Embeddings:
    """What ``ServingCore.embed`` returns: one vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int  # over all inputs


@dataclass(slots=True)
class Delta:
    """What one step added to one of the request's sequences."""

    index: int  # which of the n sequences
    token_ids: list[int]
    text: str | None  # None for a model without a tokenizer (token ids only)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last delta
    stop_text: str | None = None  # the stop string that ended the sequence
    stop_token_id: int | None = None  # or the stop token
    error: str = ""  # the engine's message when finish_reason is "error"
    error_kind: ErrorKind | None = None  # and whose fault: INTERNAL or UNAVAILABLE
    usage: Usage | None = None  # on the last delta of the whole request


def sampling_params(defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> SamplingParams:
    """SamplingParams with the gateway's limits; every bad value is a RequestError.
    ``defaults`` (the model's generation config) fill the fields ``kwargs`` leave unset
    or None."""
    for name, value in (defaults or {}).items():
        if kwargs.get(name) is None:
            kwargs[name] = value
    temperature = kwargs.get("temperature")
    if temperature is not None and temperature > MAX_TEMPERATURE:
        raise RequestError(
            ErrorKind.INVALID,
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}",
            "temperature",
        )
    n = kwargs.get("n", 1)
    if not 1 <= n <= MAX_N:
        raise RequestError(ErrorKind.INVALID, f"n must be in 1..{MAX_N}, got {n}", "n")
    stop = kwargs.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise RequestError(
            ErrorKind.INVALID,
            f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters",
            "stop",
        )
    bias = kwargs.get("logit_bias") or {}
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise RequestError(
            ErrorKind.INVALID,
            f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_TOKENS}",
            "logit_bias",
        )
    if len(kwargs.get("stop_token_ids") or ()) > MAX_STOP_TOKEN_IDS:
        raise RequestError(
            ErrorKind.INVALID, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", "stop_token_ids"
        )
    if any(not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for v in bias.values()):
        raise RequestError(
            ErrorKind.INVALID,
            f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
            "logit_bias",
        )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        param = str(e).split(" ", 1)[0]
        raise RequestError(ErrorKind.INVALID, str(e), param if param in kwargs else None) from e


async def check_constraint(constraint: Constraint) -> None:
    """RequestError (INVALID) unless the constraint compiles within the limits of
    common/constraints.py; the compile runs off the event loop."""
    try:
        await asyncio.to_thread(constraints.check, constraint)
    except constraints.ConstraintError as e:
        raise RequestError(ErrorKind.INVALID, str(e), "constraint") from None


def chat_prompt(prompt: ChatPrompt) -> ChatPrompt:
    """The chat with each role checked and named as the template takes it
    (common.request_fields), the same for either front; RequestError naming the turn."""
    try:
        turns = tuple((chat_role(i, role), content)
                      for i, (role, content) in enumerate(prompt.messages))
    except ValueError as e:
        raise RequestError(ErrorKind.INVALID, str(e), "messages") from None
    return replace(prompt, messages=turns)


# -- the core ------------------------------------------------------------------------------


class ServingCore:
    """Admission, tokenization, validation and the engine link, for any front."""

    def __init__(
        self,
        model: str,
        max_open_requests: int,
        engine: EngineClient,
        tokenizers: TokenizerClient | None,
        tokenizer: Tokenizer | None,
        info: engine_pb2.EngineInfo,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.max_open_requests = max_open_requests
        self.engine = engine
        self.tokenizers = tokenizers
        self.tokenizer = tokenizer
        self.info = info
        self.metrics = metrics
        # Every name clients may use for the model (--served-model-name), and the sampling
        # settings a request that leaves them unset gets (common.generation_config).
        self.served_names: tuple[str, ...] = (model,)
        self.sampling_defaults: dict[str, Any] = {}
        self._open: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._background: set[asyncio.Task] = set()  # aborts sent from finally blocks
        self._serials = itertools.count(1)  # one per admitted request: its sequence ids

    @property
    def num_open(self) -> int:
        return len(self._open)

    def serves(self, model: str) -> bool:
        return not model or model in self.served_names or model in (self.model, self.info.model)

    async def open(self, request: GenerationRequest) -> Generation:
        """Admit, tokenize, validate and start ``request``; raises RequestError."""
        started = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        try:
            check_cache_salt(request.cache_salt)
        except ValueError as e:
            raise RequestError(ErrorKind.INVALID, str(e), "cache_salt") from None
        params = request.params
        if params.constraint is not None:
            await check_constraint(params.constraint)
        self._admit(rid, request.model)
        self._open[rid] = []  # holds the slot while the prompt is tokenized
        try:
            prompt = await self._prompt_ids(request.prompt, params)
            self._check(prompt, params)
            # Never the client's id, which it may reuse as soon as its stream ends: outputs
            # or aborts still on their way for the old sequences must not reach the new ones.
            serial = next(self._serials)
            ids = [f"{self.engine.identity}/{serial}/{i}" for i in range(params.n)]
            self._open[rid] = ids
            generation = Generation(self, rid, ids, prompt, params, started)  # opens the queue
        except BaseException:
            self._open.pop(rid, None)
            raise
        try:
            await self.engine.add(
                [self._sequence(s, i, prompt, params, request) for i, s in enumerate(ids)]
            )
        except EngineUnavailable as e:  # lost, or not connected: fail fast
            generation.close()
            raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from None
        except BaseException:
            generation.close()
            raise
        return generation

    async def embed(
        self,
        prompts: list[TextPrompt | TokenPrompt],
        model: str = "",
        *,
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> Embeddings:
        """The mean final hidden state of each prompt (L2-normalised unless ``normalize``
        is False), computed by the engine beside the generating requests; RequestError
        if an input is empty or too long, ``dimensions`` is not the model's hidden size,
        the model is not served, or the engine refuses or fails the work."""
        if not prompts:
            raise RequestError(ErrorKind.INVALID, "input is empty: give at least one", "input")
        if len(prompts) > MAX_EMBED_INPUTS:
            raise RequestError(
                ErrorKind.INVALID,
                f"{len(prompts)} inputs; at most {MAX_EMBED_INPUTS} in one request",
                "input",
            )
        hidden_size = self.info.hidden_size
        if dimensions is not None and dimensions != hidden_size:
            raise RequestError(
                ErrorKind.INVALID,
                f"dimensions must be the model's hidden size {hidden_size} (vectors are "
                f"not truncated), got {dimensions}",
                "dimensions",
            )
        started = time.monotonic()
        rid = uuid.uuid4().hex
        self._admit(rid, model)
        self._open[rid] = []  # holds the slot while the inputs are tokenized
        pending: set[str] = set()
        ids: list[str] = []
        times: RequestTimes | None = None  # once the work is sent: it counts in the metrics
        try:
            token_ids = [await self._embed_input(i, p) for i, p in enumerate(prompts)]
            times = RequestTimes(started, time.monotonic(), sum(len(p) for p in token_ids))
            serial = next(self._serials)
            ids = [f"{self.engine.identity}/{serial}/{i}" for i in range(len(prompts))]
            self._open[rid] = ids
            queue = self.engine.open(ids)
            pending.update(ids)
            try:
                await self.engine.add([
                    engine_pb2.AddSequence(request_id=sid, prompt_token_ids=p, embed=True)
                    for sid, p in zip(ids, token_ids, strict=True)
                ])  # fmt: skip
            except EngineUnavailable as e:
                raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from None
            vectors = await self._embeddings(queue, ids, pending, times)
        finally:
            self._release(rid, list(pending), ids)
            if self.metrics is not None and times is not None and not times.rejected:
                times.completed = len(times.finish_reasons) == len(ids)
                self.metrics.request_done(time.monotonic() - started, times.prompt_tokens, 0,
                                          completed=times.completed)  # fmt: skip
                self.metrics.request_finished(times)
        if normalize:
            vectors = [l2_normalize(v) for v in vectors]
        return Embeddings(vectors, times.prompt_tokens)

    async def abort(self, request_id: str) -> bool:
        """Abort an open request by its id; its streams end with finish reason "abort"."""
        ids = self._open.get(request_id)
        if not ids:
            return False
        await self.engine.abort(ids)
        queue = self.engine.queue_for(ids[0])
        if queue is not None:
            for sid in ids:
                queue.put_nowait(OutputRow(sid, [], finished=True, finish_reason="abort"))
        return True

    async def status(self, timeout: float | None = None) -> engine_pb2.StatusReply:
        try:
            return await self.engine.status(timeout)
        except EngineUnavailable as e:
            raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from e

    async def reset_prefix_cache(self) -> int:
        """Drop the engine's cached prefixes; returns how many cached blocks it dropped."""
        try:
            reply = await self.engine.status(reset_prefix_cache=True)
        except EngineUnavailable as e:
            raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from e
        return reply.num_prefix_cache_blocks_dropped

    async def tokenize(self, prompt: TextPrompt | ChatPrompt, add_special_tokens: bool = True
                       ) -> tuple[list[int], str]:
        """Token ids and the tokenized text (the rendered template for a chat)."""
        if isinstance(prompt, ChatPrompt):
            prompt = chat_prompt(prompt)
        tokenizers = self._tokenizers()
        try:
            if isinstance(prompt, ChatPrompt):
                turns = [{"role": r, "content": c} for r, c in prompt.messages]
                for turn, (calls, call_id) in zip(turns, prompt.tool_fields, strict=False):
                    turn.update(tool_calls_json=calls, tool_call_id=call_id)
                result = await tokenizers.tokenize_chat(
                    turns,
                    add_generation_prompt=prompt.add_generation_prompt,
                    tools_json=prompt.tools_json,
                )
                return result.token_ids, result.text
            ids = await tokenizers.tokenize_text(prompt.text, add_special_tokens)
            return ids, prompt.text
        except TokenizerInputError as e:
            raise RequestError(ErrorKind.INVALID, str(e)) from e
        except TokenizerUnavailable as e:
            raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from e

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        tokenizers = self._tokenizers()
        try:
            return await tokenizers.detokenize(token_ids, skip_special_tokens)
        except TokenizerInputError as e:
            raise RequestError(ErrorKind.INVALID, str(e)) from e
        except TokenizerUnavailable as e:
            raise RequestError(ErrorKind.UNAVAILABLE, str(e)) from e

    def no_tokenizer_message(self) -> str:
        return f"model {self.model!r} has no tokenizer; send token ids"

    # -- helpers -----------------------------------------------------------------------------

    async def _embed_input(self, index: int, prompt: TextPrompt | TokenPrompt) -> list[int]:
        """An embeddings input as token ids, checked like a prompt; RequestError naming it."""
        if isinstance(prompt, TextPrompt):
            if not prompt.text:
                raise RequestError(ErrorKind.INVALID, f"input {index} is an empty string",
                                   "input")  # fmt: skip
            ids, _ = await self.tokenize(prompt)
        else:
            ids = list(prompt.token_ids)
        if not ids:
            raise RequestError(ErrorKind.INVALID, f"input {index} has no tokens", "input")
        _check_vocabulary(ids, self.info.vocab_size, "input", f"input {index}: token ids")
        limit = self.info.max_model_len
        if len(ids) >= limit:
            raise RequestError(
                ErrorKind.INVALID,
                f"input {index} has {len(ids)} tokens; at most {limit - 1} fit "
                f"(max_model_len {limit})",
                "input",
            )
        return ids

    async def _embeddings(
        self, queue: asyncio.Queue, ids: list[str], pending: set[str], times: RequestTimes
    ) -> list[list[float]]:
        """The vectors of the embed sequences ``ids`` as their outputs arrive; each one
        is taken out of ``pending`` when it ends (its reason noted in ``times``).
        RequestError if one fails or the scheduler refuses them."""
        vectors: dict[str, list[float]] = {}
        while pending:
            item = await queue.get()
            if isinstance(item, engine_pb2.Rejection):
                pending.clear()  # nothing of a rejected request was admitted
                times.rejected = True
                raise RequestError(_REJECTION_KINDS.get(item.kind, ErrorKind.INVALID), item.message)
            if item.request_id not in pending or not item.finished:
                continue
            if item.queue_seconds and times.queue_seconds is None:
                times.queue_seconds = item.queue_seconds
            pending.discard(item.request_id)
            times.finish_reasons.append(item.finish_reason)
            if item.finish_reason == "error":
                raise RequestError(_ERROR_KINDS.get(item.error_kind, ErrorKind.INTERNAL),
                                   item.error or "the engine failed the request")  # fmt: skip
            if item.finish_reason != "stop" or not item.embedding:
                raise RequestError(ErrorKind.INTERNAL,
                                   f"the embedding ended without a vector ({item.finish_reason})")
            vectors[item.request_id] = list(item.embedding)
        return [vectors[sid] for sid in ids]

    def _tokenizers(self) -> TokenizerClient:
        if self.tokenizers is None:
            raise RequestError(ErrorKind.INVALID, self.no_tokenizer_message())
        return self.tokenizers

    def _admit(self, rid: str, model: str) -> None:
        if not self.serves(model):
            raise RequestError(
                ErrorKind.UNKNOWN_MODEL,
                f"unknown model {model!r}; this server serves {self.model!r}",
                "model",
            )
        if rid in self._open:
            raise RequestError(ErrorKind.INVALID, f"request_id {rid!r} is already streaming")
        if len(self._open) >= self.max_open_requests:
            raise RequestError(
                ErrorKind.OVERLOADED,
                f"{len(self._open)} requests open on this gateway; retry later",
            )
        lost = getattr(self.engine, "lost_reason", None)  # test doubles may not track it
        if lost is not None:  # no tokenizing for a request that cannot run
            raise RequestError(ErrorKind.UNAVAILABLE, f"the engine is unavailable: {lost}")

    async def _prompt_ids(self, prompt: Prompt | None, params: SamplingParams) -> list[int]:
        if self.tokenizer is None and params.stop:
            raise RequestError(
                ErrorKind.INVALID, "stop strings need a tokenizer: " + self.no_tokenizer_message()
            )
        if prompt is None:
            raise RequestError(
                ErrorKind.INVALID, "the request has no input: set text, chat or token_ids"
            )
        if isinstance(prompt, TokenPrompt):
            return list(prompt.token_ids)
        if isinstance(prompt, ChatPrompt) and not prompt.messages:
            raise RequestError(ErrorKind.INVALID, "chat has no messages", "messages")
        ids, _ = await self.tokenize(prompt)
        return ids

    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise RequestError(ErrorKind.INVALID, "the prompt is empty", "prompt")
        vocab = self.info.vocab_size
        _check_vocabulary(prompt, vocab, "prompt")
        _check_vocabulary(params.logit_bias or {}, vocab, "logit_bias", "logit_bias token ids")
        limit = self.info.max_model_len
        if len(prompt) >= limit:
            raise RequestError(
                ErrorKind.INVALID,
                f"the prompt has {len(prompt)} tokens; max_model_len is {limit}, which must "
                "leave room for at least one generated token",
                "prompt",
            )
        if params.max_tokens is not None and len(prompt) + params.max_tokens > limit:
            raise RequestError(
                ErrorKind.INVALID,
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({limit})",
                "max_tokens",
            )

    def _sequence(
        self, sid: str, i: int, prompt: list[int], params: SamplingParams,
        request: GenerationRequest,
    ) -> engine_pb2.AddSequence:
        options: SamplingOptions = params.to_options(tuple(self.info.eos_token_ids), seed_offset=i)
        if options.seed is not None and options.seed >= 1 << 64:  # seed + i past uint64
            options = replace(options, seed=options.seed % (1 << 64))  # the sampler's own mask
        return engine_pb2.AddSequence(
            request_id=sid,
            prompt_token_ids=prompt,
            sampling=sampling_to_pb(options),
            stop=engine_pb2.StopConditions(
                max_tokens=params.effective_max_tokens(len(prompt), self.info.max_model_len),
                min_tokens=params.min_tokens,
                stop_token_ids=params.stop_token_ids,
                ignore_eos=params.ignore_eos,
            ),
            priority=request.priority,
            cache_salt=request.cache_salt,
        )

    def _release(self, rid: str, pending: list[str], ids: list[str]) -> None:
        if pending:  # cancelled, disconnected, or failed: free the blocks now
            task = asyncio.get_running_loop().create_task(self.engine.abort(pending))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.engine.close_ids(ids)
        self._open.pop(rid, None)


def _check_vocabulary(
    ids: Iterable[int], vocab: int, field: str, what: str = "token ids"
) -> None:
    """RequestError naming ``field`` unless every id is in [0, vocab)."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(
            ErrorKind.INVALID, f"{what} {bad[:5]} are outside the vocabulary [0, {vocab})", field
        )


class Generation:
    """One admitted request: its sequences' deltas, in step order. ``close`` on every exit."""

    def __init__(
        self,
        core: ServingCore,
        request_id: str,
        sequence_ids: list[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        started: float,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self._core = core
        self._ids = sequence_ids
        self._index = {sid: i for i, sid in enumerate(sequence_ids)}
        self._pending = set(sequence_ids)
        self._queue = core.engine.open(sequence_ids)
        self._streams = [
            TextStream(
                core.tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            )
            if core.tokenizer is not None
            else None
            for _ in sequence_ids
        ]
        self._started = started
        self._first_token_at: float | None = None
        self._times = RequestTimes(started, time.monotonic(), len(prompt_token_ids))
        self._completion_tokens = 0
        self._cached_tokens = 0  # as the scheduler reports it for sequence 0
        self._num_streamed = 0  # tokens handed out, finished sequences or not
        self._rejected = False
        self._closed = False
        # Outputs taken from the queue while coalescing that belong to the next delta.
        self._carry: deque[OutputRow | engine_pb2.Rejection] = deque()
        # Without stop strings, a sequence's queued outputs merge into one delta: a
        # client (or a gateway) that falls behind the engine gets fewer, larger messages
        # instead of falling further behind. A stop string must see each step alone,
        # so that no token after it is ever sent.
        self._coalesce = not params.stop

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas until every sequence has finished; RequestError if the engine refused it."""
        while self._pending:
            item = self._carry.popleft() if self._carry else await self._queue.get()
            if isinstance(item, engine_pb2.Rejection):
                self._pending.clear()  # nothing of a rejected request was admitted
                self._rejected = True
                raise RequestError(_REJECTION_KINDS.get(item.kind, ErrorKind.INVALID), item.message)
            if item.request_id not in self._pending:
                continue
            if item.queue_seconds and self._times.queue_seconds is None:
                self._times.queue_seconds = item.queue_seconds  # before a merge drops it
            if self._coalesce:
                item = self._merge_queued(item)
            if self._index[item.request_id] == 0:  # outputs made here (aborts) carry 0
                self._cached_tokens = max(self._cached_tokens, item.num_cached_tokens)
            delta = self._delta(item)
            self._num_streamed += len(delta.token_ids)
            if delta.token_ids:
                self._token_times(time.monotonic())
            if delta.finish_reason:
                self._times.finish_reasons.append(delta.finish_reason)
                self._pending.discard(item.request_id)
                self._completion_tokens += item.num_output_tokens
                if not item.finished:  # a stop string: the scheduler still runs it
                    await self._core.engine.abort([item.request_id])
            if not self._pending:
                delta.usage = Usage(
                    len(self.prompt_token_ids), self._completion_tokens, self._cached_tokens
                )
            yield delta

    def _token_times(self, now: float) -> None:
        metrics, times = self._core.metrics, self._times
        if self._first_token_at is None:
            self._first_token_at = times.first_token_at = now
            if metrics is not None:
                metrics.first_token(now - self._started)
        elif metrics is not None and times.last_token_at is not None:
            metrics.inter_token(now - times.last_token_at)
        times.last_token_at = now

    def _merge_queued(self, item: OutputRow) -> OutputRow:
        """item with the outputs of its sequence queued right behind it appended."""
        tokens: list[int] = []
        logprobs: list[engine_pb2.TokenLogprob] = []
        last = item
        while not last.finished and not self._carry:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(nxt, engine_pb2.Rejection) or nxt.request_id != item.request_id:
                self._carry.append(nxt)
                break
            tokens.extend(nxt.new_token_ids)
            logprobs.extend(nxt.new_logprobs)
            last = nxt
        if last is item:
            return item
        # The newest state (finished, reason, counts), with every queued token.
        return replace(
            last,
            new_token_ids=[*item.new_token_ids, *tokens],
            new_logprobs=[*item.new_logprobs, *logprobs],
        )

    def close(self) -> None:
        """Abort what still runs and forget the request; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._core.metrics is not None and not self._rejected:
            self._core.metrics.request_done(
                time.monotonic() - self._started,
                len(self.prompt_token_ids),
                self._num_streamed,
                completed=not self._pending,
            )
            self._times.generation_tokens = self._num_streamed
            self._times.completed = not self._pending
            self._core.metrics.request_finished(self._times)
        self._core._release(self.request_id, list(self._pending), self._ids)
        self._pending.clear()

    def _delta(self, out: OutputRow) -> Delta:
        i = self._index[out.request_id]
        delta = Delta(
            index=i,
            token_ids=list(out.new_token_ids),
            text=None,
            logprobs=[logprobs_from_pb(lp) for lp in out.new_logprobs],
        )
        stream = self._streams[i]
        if stream is not None:
            stream.push(delta.token_ids)
            if stream.matched_stop is None and out.finished:
                stream.finish()
        if stream is not None and stream.matched_stop is not None:
            delta.finish_reason = "stop"
            delta.stop_text = stream.matched_stop
        elif out.finished:
            reason = out.finish_reason
            delta.finish_reason = reason if reason in ("stop", "length", "abort") else "error"
            if delta.finish_reason == "error":
                delta.error = out.error or "the engine failed the request"
                # older schedulers send no error_kind (""): their failures are internal
                delta.error_kind = _ERROR_KINDS.get(out.error_kind, ErrorKind.INTERNAL)
            if out.stop_token_id is not None:
                delta.stop_token_id = out.stop_token_id
        if stream is not None:
            delta.text = stream.take(final=delta.finish_reason is not None)
        return delta
