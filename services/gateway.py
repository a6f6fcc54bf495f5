"""The gateway: Tessera's public gRPC API (``tessera.v1.Tessera``), health and reflection.

Thin servicer: it validates a request, tokenizes it through the tokenizer replicas,
hands it to the scheduler over ZeroMQ (``EngineClient``), and streams the outputs back
with incremental detokenization and exact stop strings (``TextStream``). Domain types
inside, protobuf only at the two edges. A client that cancels or disconnects has its
sequences aborted, which frees their KV blocks within one scheduler step.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from executor.plan import SamplingOptions
from executor.process import exit_with_parent, install_uvloop, setup_logging
from executor.registry import resolve_model
from executor.wire import sampling_to_pb
from proto.tessera.v1 import engine_pb2, generate_pb2, generate_pb2_grpc
from services.engine_client import EngineClient, EngineUnavailable
from tessera.sampling_params import SamplingParams
from tokenizer_svc.client import TokenizerClient, TokenizerInputError, TokenizerUnavailable
from tokenizer_svc.text_stream import TextStream
from tokenizer_svc.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
_FINISH = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
    "error": generate_pb2.FINISH_REASON_ERROR,
}
_OPTIONAL_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "ignore_eos",
    "n",
    "logprobs",
)


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"  # the public port; 0.0.0.0 in containers
    port: int = 50051
    scheduler_address: str = "ipc:///tmp/tessera-scheduler.sock"
    # Comma-separated replicas; empty only for a model without a tokenizer (random
    # weights for benchmarks), which then takes token ids and streams no text.
    tokenizer_addresses: str = "127.0.0.1:50061"
    grace_seconds: float = 30.0  # in-flight streams get this long to finish on SIGTERM
    max_open_requests: int = 4096  # per gateway; past it: RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.grace_seconds < 0 or self.max_open_requests < 1:
            raise ValueError("grace_seconds must be >= 0 and max_open_requests >= 1")


class _RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TesseraServicer(generate_pb2_grpc.TesseraServicer):
    def __init__(
        self,
        config: GatewayConfig,
        engine: EngineClient,
        tokenizers: TokenizerClient | None,
        tokenizer: Tokenizer | None,
        info: engine_pb2.EngineInfo,
    ) -> None:
        self.config = config
        self.engine = engine
        self.tokenizers = tokenizers
        self.tokenizer = tokenizer
        self.info = info
        self._open: dict[str, list[str]] = {}  # client request id -> internal sequence ids

    # -- Generate ------------------------------------------------------------------

    async def Generate(self, request: generate_pb2.GenerateRequest, context):  # noqa: N802
        rid = request.request_id or uuid.uuid4().hex
        try:
            self._check_admission(rid, request.model)
            params = _sampling_params(request.sampling)
            prompt = await self._prompt_ids(request)
            self._check_prompt(prompt, params)
        except _RequestError as e:
            await context.abort(e.code, e.message)
            return
        ids = [f"{self.engine.identity}/{rid}/{i}" for i in range(params.n)]
        self._open[rid] = ids
        queue = self.engine.open(ids)
        index = {sid: i for i, sid in enumerate(ids)}
        streams = [
            TextStream(self.tokenizer, prompt, params.skip_special_tokens, params.stop)
            if self.tokenizer is not None
            else None
            for _ in ids
        ]
        pending = set(ids)
        completion_tokens = 0
        try:
            await self.engine.add(
                [
                    self._sequence(sid, i, prompt, params, request.priority)
                    for i, sid in enumerate(ids)
                ]
            )
            while pending:
                item = await queue.get()
                if isinstance(item, engine_pb2.Rejection):
                    code = (
                        grpc.StatusCode.RESOURCE_EXHAUSTED
                        if item.kind == "overloaded"
                        else grpc.StatusCode.INVALID_ARGUMENT
                    )
                    pending.clear()  # nothing of a rejected request was admitted
                    await context.abort(code, item.message)
                    return
                if item.request_id not in pending:
                    continue
                resp = self._response(rid, index[item.request_id], item, streams)
                if resp.finish_reason:
                    pending.discard(item.request_id)
                    completion_tokens += item.num_output_tokens
                    if not item.finished:  # a stop string: the scheduler still runs it
                        await self.engine.abort([item.request_id])
                if not pending:
                    resp.usage.CopyFrom(
                        generate_pb2.Usage(
                            prompt_tokens=len(prompt), completion_tokens=completion_tokens
                        )
                    )
                yield resp
        finally:
            if pending:  # cancelled, disconnected, or failed: free the blocks now
                asyncio.get_running_loop().create_task(self.engine.abort(list(pending)))
            self.engine.close_ids(ids)
            self._open.pop(rid, None)

    def _response(
        self, rid: str, i: int, out: engine_pb2.SequenceOutput, streams: list[TextStream | None]
    ) -> generate_pb2.GenerateResponse:
        resp = generate_pb2.GenerateResponse(
            request_id=rid,
            index=i,
            token_ids=out.new_token_ids,
            logprobs=[_logprob_pb(lp) for lp in out.new_logprobs],
        )
        stream = streams[i]
        if stream is not None:
            stream.push(list(out.new_token_ids))
            if stream.matched_stop is None and out.finished:
                stream.finish()
        if stream is not None and stream.matched_stop is not None:
            resp.finish_reason = generate_pb2.FINISH_REASON_STOP
            resp.stop_text = stream.matched_stop
        elif out.finished:
            resp.finish_reason = _FINISH.get(out.finish_reason, generate_pb2.FINISH_REASON_ERROR)
            if out.HasField("stop_token_id"):
                resp.stop_token_id = out.stop_token_id
        if stream is not None:  # None: a model without a tokenizer streams token ids only
            resp.text = stream.take(final=bool(resp.finish_reason))
        return resp

    def _sequence(
        self, sid: str, i: int, prompt: list[int], params: SamplingParams, priority: int
    ) -> engine_pb2.AddSequence:
        eos = tuple(self.info.eos_token_ids)
        options: SamplingOptions = params.to_options(eos, seed_offset=i)
        max_tokens = params.effective_max_tokens(len(prompt), self.info.max_model_len)
        return engine_pb2.AddSequence(
            request_id=sid,
            prompt_token_ids=prompt,
            sampling=sampling_to_pb(options),
            stop=engine_pb2.StopConditions(
                max_tokens=max_tokens,
                min_tokens=params.min_tokens,
                stop_token_ids=params.stop_token_ids,
                ignore_eos=params.ignore_eos,
            ),
            priority=priority,
        )

    def _check_admission(self, rid: str, model: str) -> None:
        if model and model not in (self.config.model, self.info.model):
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown model {model!r}; this server serves {self.config.model!r}",
            )
        if rid in self._open:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already streaming"
            )
        if len(self._open) >= self.config.max_open_requests:
            raise _RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._open)} requests open on this gateway; retry later",
            )

    async def _prompt_ids(self, request: generate_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind in ("text", "chat") and self.tokenizers is None:
            raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, self._no_tokenizer())
        if self.tokenizer is None and request.sampling.stop:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "stop strings need a tokenizer: " + self._no_tokenizer(),
            )
        try:
            if kind == "text":
                return await self.tokenizers.tokenize_text(request.text)
            if kind == "chat":
                if not request.chat.messages:
                    raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat has no messages")
                ids, _ = await _tokenize_chat(self.tokenizers, request.chat)
                return ids
            if kind == "token_ids":
                return list(request.token_ids.ids)
        except TokenizerInputError as e:
            raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except TokenizerUnavailable as e:
            raise _RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from e
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request has no input: set text, chat or token_ids",
        )

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        vocab = self.info.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
            )
        limit = self.info.max_model_len
        if len(prompt) >= limit:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the prompt has {len(prompt)} tokens; max_model_len is {limit}, which must "
                "leave room for at least one generated token",
            )
        if params.max_tokens is not None and len(prompt) + params.max_tokens > limit:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({limit})",
            )

    # -- unary RPCs ------------------------------------------------------------------

    def _no_tokenizer(self) -> str:
        return f"model {self.config.model!r} has no tokenizer; send token_ids"

    async def Tokenize(self, request, context):  # noqa: N802
        if self.tokenizers is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._no_tokenizer())
        try:
            if request.WhichOneof("input") == "chat":
                ids, text = await _tokenize_chat(self.tokenizers, request.chat)
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") else True
                text = request.text
                ids = await self.tokenizers.tokenize_text(text, add_special_tokens=add)
        except TokenizerInputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TokenizerUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return generate_pb2.TokenizeResponse(token_ids=ids, text=text)

    async def Detokenize(self, request, context):  # noqa: N802
        if self.tokenizers is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._no_tokenizer())
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            text = await self.tokenizers.detokenize(
                list(request.token_ids), skip_special_tokens=skip
            )
        except TokenizerInputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TokenizerUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return generate_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):  # noqa: N802
        status = await self._status(context)
        i = status.info
        return generate_pb2.ModelInfo(
            model=self.config.model,
            max_model_len=i.max_model_len,
            vocab_size=i.vocab_size,
            block_size=i.block_size,
            num_kv_blocks=i.num_kv_blocks,
            eos_token_ids=i.eos_token_ids,
        )

    async def GetLoad(self, request, context):  # noqa: N802
        load = (await self._status(context)).load
        return generate_pb2.Load(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_kv_blocks_used=load.num_kv_blocks_used,
            num_kv_blocks_free=load.num_kv_blocks_free,
        )

    async def Abort(self, request, context):  # noqa: N802
        ids = self._open.get(request.request_id)
        if ids is None:
            return generate_pb2.AbortResponse(found=False)
        await self.engine.abort(ids)
        queue_outputs = [
            engine_pb2.SequenceOutput(request_id=sid, finished=True, finish_reason="abort")
            for sid in ids
        ]
        queue = self.engine.queue_for(ids[0])
        if queue is not None:
            for out in queue_outputs:
                queue.put_nowait(out)
        return generate_pb2.AbortResponse(found=True)

    async def _status(self, context) -> engine_pb2.StatusReply:
        try:
            return await self.engine.status()
        except EngineUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise


async def _tokenize_chat(
    tokenizers: TokenizerClient, chat: generate_pb2.ChatMessages
) -> tuple[list[int], str]:
    """Chat turns through the model's template; the generation prompt is on unless unset."""
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return await tokenizers.tokenize_chat(
        [{"role": m.role, "content": m.content} for m in chat.messages],
        add_generation_prompt=add_prompt,
    )


def _sampling_params(s: generate_pb2.SamplingParameters) -> SamplingParams:
    kwargs = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
    if "temperature" in kwargs and kwargs["temperature"] > 2.0:
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"temperature must be in [0, 2], got {kwargs['temperature']}",
        )
    if kwargs.get("n", 1) > MAX_N or kwargs.get("n", 1) < 1:
        raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"n must be in 1..{MAX_N}")
    if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_LENGTH for x in s.stop):
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters",
        )
    try:
        return SamplingParams(
            **kwargs,
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            skip_special_tokens=not s.include_special_tokens,
        )
    except ValueError as e:
        raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e


def _logprob_pb(lp: engine_pb2.TokenLogprob) -> generate_pb2.TokenLogprob:
    return generate_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[
            generate_pb2.TopLogprob(token_id=t, logprob=v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ],
    )


# -- the process -----------------------------------------------------------------------


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    engine = EngineClient(config.scheduler_address)
    engine.start()
    addresses = [a.strip() for a in config.tokenizer_addresses.split(",") if a.strip()]
    tokenizers = TokenizerClient(addresses) if addresses else None
    status = await _wait_for_engine(engine)
    tokenizer = Tokenizer.load(resolve_model(config.model))
    if (tokenizer is None) != (tokenizers is None):
        raise ValueError(
            f"model {config.model!r} {'has no' if tokenizer is None else 'has a'} tokenizer: "
            "tokenizer_addresses must be " + ("empty" if tokenizer is None else "set")
        )
    servicer = TesseraServicer(config, engine, tokenizers, tokenizer, status.info)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
    )
    generate_pb2_grpc.add_TesseraServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        generate_pb2.DESCRIPTOR.services_by_name["Tessera"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind the gateway to {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_engine(engine, health_servicer, names[0]))
    logger.info("gateway serving %s on %s", config.model, address)
    if ready is not None:
        ready.set()
    await stop.wait()
    logger.info(
        "shutting down: new calls refused, %d in flight get %.0fs to finish",
        len(servicer._open),
        config.grace_seconds,
    )
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    watcher.cancel()
    await engine.close()
    if tokenizers is not None:
        await tokenizers.close()


async def _wait_for_engine(engine: EngineClient, attempts: int = 600) -> engine_pb2.StatusReply:
    for _ in range(attempts):
        try:
            return await engine.status(timeout=1.0)
        except EngineUnavailable:
            logger.info("waiting for the scheduler...")
    raise EngineUnavailable("the scheduler did not come up")


async def _watch_engine(engine: EngineClient, health_servicer, service: str) -> None:
    serving = None
    while True:
        try:
            await engine.status(timeout=3.0)
            ok = True
        except EngineUnavailable:
            ok = False
        if ok is not serving:
            state = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health_servicer.set("", state)
            await health_servicer.set(service, state)
            serving = ok
        await asyncio.sleep(2.0)


def run_gateway(config: GatewayConfig) -> None:
    setup_logging("gateway")
    install_uvloop()
    exit_with_parent()
    asyncio.run(serve(config))
