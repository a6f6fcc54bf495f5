"""The gateway process: Tessera's public gRPC API (``tessera.v1.Tessera``, with health
and reflection) and the OpenAI-compatible HTTP API (``services.openai_api``), both in
one event loop over one ``ServingCore`` (``services.core``): one link per engine
replica (``services.engine_pool``, routed by ``services.routing``), one set of
tokenizer replicas, one admission limit, one set of metrics.

Security (``services.security``): the API key guards every gRPC method, reflection
included, and every HTTP route, except the health checks; TLS (``--tls-cert-file``,
``--tls-key-file``) and mutual TLS (``--tls-client-ca-file``) apply to both ports; the
link to the scheduler needs CURVE keys when it leaves the machine (``executor.curve``).

The servicer here is thin: protobuf to the core's domain types and back. The core
validates, tokenizes, hands the request to the scheduler over ZeroMQ and streams the
outputs back with incremental detokenization and exact stop strings. A client that
cancels or disconnects has its sequences aborted, which frees their KV blocks within
one scheduler step.

Failures and limits. A stream the engine fails ends with the status of its error kind:
UNAVAILABLE when the engine cannot run it (no working executor, or the scheduler is
lost: ``services.engine_client``), INTERNAL for a bug; the tokens streamed before it
are valid. Health is NOT_SERVING while the scheduler is lost or has no executor attached
(ENGINE_STATE_RECOVERING, whose streams wait and go on, or UNAVAILABLE). Every queue is
bounded: open requests per gateway (``max_open_requests``), Generate streams per client
connection (``max_streams_per_connection``), message sizes (``max_message_bytes``);
past a bound the call is RESOURCE_EXHAUSTED, and it and UNAVAILABLE carry the trailing
metadata ``retry-after-ms``. Requests that do not parse are INVALID_ARGUMENT
(``proto.guard``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.common.constraints import Constraint
from tessera.common.curve import check_link, check_pair, client_keys
from tessera.common.generation_config import GENERATION_CONFIG_CHOICES, default_sampling
from tessera.common.plan import TokenLogprobs
from tessera.common.preflight import EXIT_CONFIG, check_port_free
from tessera.common.process import exit_with_parent, install_uvloop, process_age, setup_logging
from tessera.common.registry import resolve_model
from tessera.common.sampling_fields import PUBLIC
from tessera.common.sampling_params import SamplingParams
from tessera.common.wire import constraint_from_pb
from tessera.proto.guard import DecodeGuard
from tessera.proto.tessera.v1 import engine_pb2, generate_pb2, generate_pb2_grpc
from tessera.services.core import (
    ChatPrompt,
    Delta,
    ErrorKind,
    GenerationRequest,
    Prompt,
    RequestError,
    ServingCore,
    TextPrompt,
    TokenPrompt,
    sampling_params,
)
from tessera.services.engine_client import EngineUnavailable
from tessera.services.engine_pool import (
    EnginePool,
    ReplicaView,
    link_address,
    split_addresses,
)
from tessera.services.metrics import Metrics
from tessera.services.openai_api import HttpServer, create_app
from tessera.services.routing import DEFAULT_LOAD_THRESHOLD, RoutingPolicy
from tessera.services.security import HEALTH_SERVICE_PREFIX, BearerToken, TlsFiles
from tessera.tokenizer_svc.client import TokenizerClient
from tessera.tokenizer_svc.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_FINISH = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
    "error": generate_pb2.FINISH_REASON_ERROR,
}
# Unknown models stay INVALID_ARGUMENT on gRPC, as they always were (HTTP says 404).
_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNKNOWN_MODEL: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
RETRY_AFTER_MS = 1000  # the hint sent with RESOURCE_EXHAUSTED and UNAVAILABLE
# HTTP connections beyond max_open_requests, for health checks, metrics and clients
# that are refused with a 429 rather than uvicorn's bare 503.
HTTP_HEADROOM = 64
_RETRYABLE = (ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE)


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"  # the public ports' interface; 0.0.0.0 in containers
    port: int = 50051
    http_port: int = field(
        default=8000, metadata={"help": "OpenAI-compatible HTTP API port; 0 turns it off"}
    )
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "clients must send Authorization: Bearer <key> (HTTP) or the same "
                  "authorization metadata (gRPC); health checks stay open"},
    )
    scheduler_address: str = field(
        default="ipc:///tmp/tessera-scheduler.sock",
        metadata={"help": "the engine replicas' schedulers, comma-separated; dns://NAME:PORT "
                  "stands for every address NAME resolves to (a headless Service); "
                  "file:PATH for the addresses a file lists, one a line, read every "
                  "second (tessera serve --cluster ray)"},
    )
    routing_policy: str = field(
        default="cache_aware",
        metadata={"help": "which replica runs a request: cache_aware (the one that holds its "
                  "prefix, unless much more loaded), least_loaded or round_robin"},
    )
    routing_load_threshold: int = field(
        default=DEFAULT_LOAD_THRESHOLD,
        metadata={"help": "cache_aware: sequences by which the prefix's replica may exceed "
                  "the least-loaded one before the request goes to the latter"},
    )
    # Comma-separated replicas; empty only for a model without a tokenizer (random
    # weights for benchmarks), which then takes token ids and streams no text.
    tokenizer_addresses: str = "127.0.0.1:50061"
    grace_seconds: float = 30.0  # in-flight streams get this long to finish on SIGTERM
    max_open_requests: int = 4096  # per gateway; past it: RESOURCE_EXHAUSTED / HTTP 429
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC messages and HTTP bodies
    reuse_port: bool = field(
        default=False,
        metadata={"help": "share port and http_port with other gateways (SO_REUSEPORT; "
                  "tessera serve --num-gateways); else a taken port is an error"},
    )
    max_streams_per_connection: int = field(
        default=256,
        metadata={"help": "Generate streams open at once on one gRPC client connection; "
                  "past it: RESOURCE_EXHAUSTED"},
    )
    heartbeat_timeout: float = field(
        default=10.0,
        metadata={"help": "seconds of silence from this gateway after which the scheduler "
                  "aborts its requests (it sends a heartbeat every second)"},
    )
    scheduler_timeout: float = field(
        default=5.0,
        metadata={"help": "seconds of silence from the scheduler after which open streams end "
                  "with UNAVAILABLE and health turns NOT_SERVING"},
    )
    tls_cert_file: str | None = field(
        default=None,
        metadata={"help": "PEM certificate chain: serve TLS on both ports (with tls_key_file)"},
    )
    tls_key_file: str | None = field(
        default=None, metadata={"help": "PEM private key of tls_cert_file"}
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle: require client certificates it signed, on both "
                  "ports (mutual TLS)"},
    )
    curve_secret_key_file: str | None = field(
        default=None,
        metadata={"help": "CURVE: this gateway's key pair (NAME.key_secret); needed, with "
                  "curve_server_key_file, when scheduler_address is beyond loopback"},
    )
    curve_server_key_file: str | None = field(
        default=None, metadata={"help": "CURVE: the scheduler's public key (NAME.key)"}
    )
    served_model_name: tuple[str, ...] = field(
        default=(),
        metadata={"help": "names clients may give as `model` (the first is the one "
                  "responses carry); default: the model argument"},
    )
    generation_config: str = field(
        default="auto",
        metadata={"help": "auto: requests that leave a sampling setting unset get the "
                  "model's generation_config.json value (the default model: temperature "
                  "0.2, top_p 0.9); none: the API's defaults"},
    )

    def __post_init__(self) -> None:
        if self.generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_CHOICES}, "
                             f"got {self.generation_config!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not 0 <= self.http_port < 65536 or self.http_port == self.port:
            raise ValueError(
                f"http_port must be in 0..65535 (0: off) and differ from port, got "
                f"{self.http_port}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; leave it unset for no key")
        if self.grace_seconds < 0 or self.max_open_requests < 1:
            raise ValueError("grace_seconds must be >= 0 and max_open_requests >= 1")
        if self.max_streams_per_connection < 1:
            raise ValueError(
                f"max_streams_per_connection must be >= 1, got {self.max_streams_per_connection}"
            )
        if not self.heartbeat_timeout >= 1 or not self.scheduler_timeout >= 1:
            raise ValueError(
                "heartbeat_timeout and scheduler_timeout must be >= 1 second, got "
                f"{self.heartbeat_timeout} and {self.scheduler_timeout}"
            )
        check_pair(self.tls_cert_file, self.tls_key_file, "tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        has_keys = check_pair(
            self.curve_secret_key_file, self.curve_server_key_file,
            "curve_secret_key_file and curve_server_key_file",
        )
        for entry in split_addresses(self.scheduler_address):
            check_link(link_address(entry), has_keys,
                       "--curve-secret-key-file and --curve-server-key-file")
        RoutingPolicy.parse(self.routing_policy)
        if self.routing_load_threshold < 0:
            raise ValueError(
                f"routing_load_threshold must be >= 0, got {self.routing_load_threshold}"
            )


class TesseraServicer(generate_pb2_grpc.TesseraServicer):
    """The gRPC front of ``ServingCore``: protobuf in, protobuf out, nothing else."""

    def __init__(self, core: ServingCore, max_streams_per_connection: int = 256) -> None:
        self.core = core
        self.max_streams_per_connection = max_streams_per_connection
        self._streams: dict[str, int] = {}  # client connection (peer) -> open Generate calls

    async def Generate(self, request: generate_pb2.GenerateRequest, context):  # noqa: N802
        peer = context.peer()  # ipv4:host:port: one per client connection
        if self._streams.get(peer, 0) >= self.max_streams_per_connection:
            await _abort(context, RequestError(
                ErrorKind.OVERLOADED,
                f"{self.max_streams_per_connection} streams are open on this connection "
                "(max_streams_per_connection); retry later or open another connection",
            ))  # fmt: skip
        self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            async for response in self._generate(request, context):
                yield response
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def _generate(self, request: generate_pb2.GenerateRequest, context):
        try:
            gen = await self.core.open(_request_from_pb(request, self.core.sampling_defaults))
        except RequestError as e:
            await _abort(context, e)
            return
        try:
            async for delta in gen.deltas():
                if delta.finish_reason == "error":  # the call ends with the error's status
                    if delta.token_ids:
                        delta.finish_reason, delta.usage = None, None
                        yield _response_pb(gen.request_id, delta)
                    raise RequestError(delta.error_kind or ErrorKind.INTERNAL, delta.error)
                yield _response_pb(gen.request_id, delta)
        except RequestError as e:
            await _abort(context, e)
        finally:
            gen.close()

    async def Tokenize(self, request, context):  # noqa: N802
        if request.WhichOneof("input") == "chat":
            prompt, add = _chat_from_pb(request.chat), False
        else:
            prompt = TextPrompt(request.text)
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            ids, text = await self.core.tokenize(prompt, add_special_tokens=add)
        except RequestError as e:
            await _abort(context, e)
        return generate_pb2.TokenizeResponse(token_ids=ids, text=text)

    async def Detokenize(self, request, context):  # noqa: N802
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            text = await self.core.detokenize(list(request.token_ids), skip_special_tokens=skip)
        except RequestError as e:
            await _abort(context, e)
        return generate_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):  # noqa: N802
        i = (await self._status(context)).info
        return generate_pb2.ModelInfo(
            model=self.core.model,
            max_model_len=i.max_model_len,
            vocab_size=i.vocab_size,
            block_size=i.block_size,
            num_kv_blocks=i.num_kv_blocks,
            eos_token_ids=i.eos_token_ids,
            hidden_size=i.hidden_size,
        )

    async def GetLoad(self, request, context):  # noqa: N802
        load = (await self._status(context)).load
        replicas = getattr(self.core.engine, "replicas", None)  # test doubles: one engine
        return generate_pb2.Load(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_kv_blocks_used=load.num_kv_blocks_used,
            num_kv_blocks_free=load.num_kv_blocks_free,
            num_kv_blocks_cached=load.num_kv_blocks_cached,
            replicas=[_replica_pb(r) for r in replicas()] if replicas is not None else [],
        )

    async def Abort(self, request, context):  # noqa: N802
        return generate_pb2.AbortResponse(found=await self.core.abort(request.request_id))

    async def ResetPrefixCache(self, request, context):  # noqa: N802
        try:
            num_dropped = await self.core.reset_prefix_cache()
        except RequestError as e:
            await _abort(context, e)
            raise
        return generate_pb2.ResetPrefixCacheResponse(num_blocks_dropped=num_dropped)

    async def Embed(self, request: generate_pb2.EmbedRequest, context):  # noqa: N802
        try:
            result = await self.core.embed(
                [_embed_input_from_pb(i, item) for i, item in enumerate(request.inputs)],
                request.model,
                normalize=request.normalize if request.HasField("normalize") else True,
                dimensions=request.dimensions if request.HasField("dimensions") else None,
            )
        except RequestError as e:
            await _abort(context, e)
            raise
        return generate_pb2.EmbedResponse(
            embeddings=[generate_pb2.Embedding(values=v) for v in result.vectors],
            usage=generate_pb2.Usage(prompt_tokens=result.prompt_tokens),
            model=self.core.model,
        )

    async def _status(self, context) -> engine_pb2.StatusReply:
        try:
            return await self.core.status()
        except RequestError as e:
            await _abort(context, e)
            raise


async def _abort(context, e: RequestError) -> None:
    """End the call with the error's status; overload and unavailability say when to retry."""
    hint = (("retry-after-ms", str(RETRY_AFTER_MS)),) if e.kind in _RETRYABLE else ()
    await context.abort(_CODES[e.kind], e.message, trailing_metadata=hint)


def _request_from_pb(
    request: generate_pb2.GenerateRequest, defaults: dict | None = None
) -> GenerationRequest:
    kind = request.WhichOneof("input")
    prompt: Prompt | None = None
    if kind == "text":
        prompt = TextPrompt(request.text)
    elif kind == "chat":
        prompt = _chat_from_pb(request.chat)
    elif kind == "token_ids":
        prompt = TokenPrompt(tuple(request.token_ids.ids))
    return GenerationRequest(
        prompt=prompt,
        params=_sampling_params(request.sampling, defaults),
        request_id=request.request_id,
        model=request.model,
        priority=request.priority,
        cache_salt=request.cache_salt,
    )


def _embed_input_from_pb(index: int, item: generate_pb2.EmbedInput) -> TextPrompt | TokenPrompt:
    kind = item.WhichOneof("input")
    if kind == "text":
        return TextPrompt(item.text)
    if kind == "token_ids":
        return TokenPrompt(tuple(item.token_ids.ids))
    raise RequestError(ErrorKind.INVALID, f"inputs[{index}] sets neither text nor token_ids",
                       "inputs")  # fmt: skip


def _chat_from_pb(chat: generate_pb2.ChatMessages) -> ChatPrompt:
    """Chat turns through the model's template; the generation prompt is on unless unset."""
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return ChatPrompt(tuple((m.role, m.content) for m in chat.messages), add_prompt)


def _sampling_params(
    s: generate_pb2.SamplingParameters, defaults: dict | None = None
) -> SamplingParams:
    kwargs = {name: getattr(s, name) for name in PUBLIC if s.HasField(name)}
    return sampling_params(
        defaults,
        **kwargs,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        skip_special_tokens=not s.include_special_tokens,
        constraint=_constraint(s),
    )


def _constraint(s: generate_pb2.SamplingParameters) -> Constraint | None:
    try:
        return constraint_from_pb(s, "constraint")
    except ValueError as e:
        raise RequestError(ErrorKind.INVALID, str(e), "constraint") from None


def _response_pb(rid: str, d: Delta) -> generate_pb2.GenerateResponse:
    resp = generate_pb2.GenerateResponse(
        request_id=rid,
        index=d.index,
        token_ids=d.token_ids,
        logprobs=[_logprob_pb(lp) for lp in d.logprobs],
    )
    if d.text is not None:  # None: a model without a tokenizer streams token ids only
        resp.text = d.text
    if d.finish_reason is not None:
        resp.finish_reason = _FINISH[d.finish_reason]
    if d.stop_text is not None:
        resp.stop_text = d.stop_text
    elif d.stop_token_id is not None:
        resp.stop_token_id = d.stop_token_id
    if d.usage is not None:
        resp.usage.CopyFrom(
            generate_pb2.Usage(
                prompt_tokens=d.usage.prompt_tokens,
                completion_tokens=d.usage.completion_tokens,
                cached_tokens=d.usage.cached_tokens,
            )
        )
    return resp


def _replica_pb(r: ReplicaView) -> generate_pb2.ReplicaLoad:
    pb = generate_pb2.ReplicaLoad(
        address=r.address, serving=r.serving, reason=r.reason, num_open=r.num_open,
        num_routed=r.num_routed, num_resumed=r.num_resumed,
    )  # fmt: skip
    if r.status is not None:
        load = r.status.load
        pb.num_running, pb.num_waiting = load.num_running, load.num_waiting
        pb.num_waiting_tokens = load.num_waiting_tokens
        pb.num_kv_blocks_used, pb.num_kv_blocks_free = (
            load.num_kv_blocks_used, load.num_kv_blocks_free)
        pb.num_kv_blocks_cached = load.num_kv_blocks_cached
    return pb


def _logprob_pb(lp: TokenLogprobs) -> generate_pb2.TokenLogprob:
    return generate_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[generate_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but the health service must carry ``authorization: Bearer <key>``."""

    def __init__(self, api_key: str) -> None:
        self._token = BearerToken(api_key)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value
        if self._token.matches(given):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key")

        kind = "unary" if handler.request_streaming is False else "stream"
        kind += "_unary" if handler.response_streaming is False else "_stream"
        return handler._replace(**{kind: deny})


# -- the process -----------------------------------------------------------------------

TESSERA_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Tessera"].full_name


def grpc_server(
    config: GatewayConfig, servicer: TesseraServicer
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The public gRPC server, not yet bound: the servicer, health and reflection, behind
    the API key check and the decode guard (last, next to the servicers: proto.guard)."""
    server = grpc.aio.server(
        interceptors=[
            *([_ApiKeyInterceptor(config.api_key)] if config.api_key else []),
            DecodeGuard(),
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # A second gateway on a taken port is an error, not a silent share of it,
            # unless the launcher started several to share it (--num-gateways).
            ("grpc.so_reuseport", int(config.reuse_port)),
        ],
    )
    generate_pb2_grpc.add_TesseraServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        TESSERA_SERVICE,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    tls = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        tls = TlsFiles.load(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    curve = client_keys(config.curve_secret_key_file, config.curve_server_key_file)
    engine = EnginePool(
        config.scheduler_address,
        RoutingPolicy.parse(config.routing_policy),
        config.routing_load_threshold,
        curve=curve,
        heartbeat_timeout=config.heartbeat_timeout,
        scheduler_timeout=config.scheduler_timeout,
    )
    await engine.start()
    addresses = [a.strip() for a in config.tokenizer_addresses.split(",") if a.strip()]
    tokenizers = TokenizerClient(addresses) if addresses else None
    # Off the event loop, and while the scheduler comes up: the engine client's heartbeats
    # run on this loop, and a loop held for the seconds a tokenizer takes to load went
    # silent long enough for the scheduler to expire this gateway (issue 19).
    source = resolve_model(config.model)
    sampling_defaults = default_sampling(source, config.generation_config)
    if sampling_defaults:
        logger.info("sampling defaults from the model (%s): %s", config.generation_config,
                    sampling_defaults)
    loading = asyncio.ensure_future(asyncio.to_thread(Tokenizer.load, source))
    try:
        status = await _wait_for_engine(engine)
        tokenizer = await loading
    except BaseException:  # an open ZeroMQ socket would hold the process at exit
        loading.cancel()
        await engine.close()
        raise
    if (tokenizer is None) != (tokenizers is None):
        raise ValueError(
            f"model {config.model!r} {'has no' if tokenizer is None else 'has a'} tokenizer: "
            "tokenizer_addresses must be " + ("empty" if tokenizer is None else "set")
        )
    names = config.served_model_name or (config.model,)
    metrics = Metrics(names[0])
    core = ServingCore(
        names[0], config.max_open_requests, engine, tokenizers, tokenizer, status.info, metrics
    )
    core.served_names = names
    core.sampling_defaults = sampling_defaults
    metrics.track_open_requests(lambda: core.num_open)
    metrics.track_replicas(engine.replicas)
    server, health_servicer = grpc_server(
        config, TesseraServicer(core, config.max_streams_per_connection)
    )
    try:
        http = await _listen(config, server, core, metrics, tls)
    except BaseException:
        await engine.close()
        if tokenizers is not None:
            await tokenizers.close()
        raise
    address = f"{config.host}:{config.port}"
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_engine(engine, health_servicer, TESSERA_SERVICE))
    logger.info(
        "gateway serving %s: gRPC on %s, HTTP %s (%s, %s; ready %.1fs after start)",
        config.model, address,
        f"on {config.host}:{config.http_port}" if http else "off",
        tls.describe() if tls is not None else "plaintext",
        "API key required" if config.api_key else "no API key", process_age(),
    )
    if tls is None and config.api_key and not _is_loopback(config.host):
        logger.warning("the API key crosses the network in plaintext: set --tls-cert-file and "
                       "--tls-key-file, unless a TLS proxy stands in front")
    if ready is not None:
        ready.set()
    await stop.wait()
    logger.info(
        "shutting down: new calls refused, %d in flight get %.0fs to finish",
        core.num_open,
        config.grace_seconds,
    )
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        http.begin_drain()
        await asyncio.gather(server.stop(config.grace_seconds), http.stop())
    else:
        await server.stop(config.grace_seconds)
    watcher.cancel()
    await engine.close()
    if tokenizers is not None:
        await tokenizers.close()


async def _listen(config: GatewayConfig, server: grpc.aio.Server, core: ServingCore,
                  metrics: Metrics, tls: TlsFiles | None) -> HttpServer | None:
    """Bind the gRPC port and start the HTTP server; PortBusy if either is taken."""
    address = f"{config.host}:{config.port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError:  # grpc >= 1.60 raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise PortBusy(f"--port: cannot listen on {address} (in use by another process?)")
    http = None
    if config.http_port:
        app = create_app(core, metrics, config.api_key, config.max_message_bytes)
        http = HttpServer(app, config.host, config.http_port, config.grace_seconds,
                          tls.uvicorn_options() if tls is not None else None,
                          limit_concurrency=config.max_open_requests + HTTP_HEADROOM,
                          reuse_port=config.reuse_port)
        try:
            await http.start()
        except OSError as e:
            raise PortBusy(f"--http-port: cannot listen on {config.host}:{config.http_port}: "
                           f"{e.strerror}") from None
    return http


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _wait_for_engine(engine: EnginePool, attempts: int = 600) -> engine_pb2.StatusReply:
    """The scheduler's first status reply. It binds its socket once its executor has
    loaded the model, so a wait of seconds is normal: said once, then every 30 s."""
    loop = asyncio.get_running_loop()
    started = said = loop.time()
    for i in range(attempts):
        try:
            status = await engine.status(timeout=1.0)
        except EngineUnavailable:
            if i == 0 or loop.time() - said >= 30:
                logger.info("waiting for the scheduler (it loads the model first; %.0fs so far)",
                            loop.time() - started)
                said = loop.time()
            await asyncio.sleep(0.5)  # not connected yet fails at once: do not spin
            continue
        logger.info("the scheduler answered after %.1fs", loop.time() - started)
        return status
    raise EngineUnavailable("the scheduler did not come up")


async def _watch_engine(engine: EnginePool, health_servicer, service: str) -> None:
    """Health follows the engine client's pulse: NOT_SERVING while the scheduler is lost
    or has no executor attached (RECOVERING or UNAVAILABLE)."""
    serving = None
    while True:
        ok = engine.serving
        if ok is not serving:
            if serving is not None:
                log = logger.info if ok else logger.warning
                log("health: %s", "SERVING" if ok else "NOT_SERVING")
            state = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health_servicer.set("", state)
            await health_servicer.set(service, state)
            serving = ok
        await asyncio.sleep(0.25)


class PortBusy(OSError):
    """A public port this gateway cannot listen on."""


def preflight(config: GatewayConfig) -> None:
    """Before loading anything: the model names something, the public ports are free
    (unless shared: another gateway of the same launcher may be listening already; the
    launcher checked them before starting any). ConfigError or ValueError, naming the
    setting."""
    resolve_model(config.model)
    if config.reuse_port:
        return
    check_port_free(config.host, config.port, "--port (gRPC)")
    if config.http_port:
        check_port_free(config.host, config.http_port, "--http-port (HTTP)")


def run_gateway(config: GatewayConfig) -> int:
    """The process; the exit code: 0 after SIGTERM, EXIT_CONFIG for a setting that cannot
    work (a model that names nothing, a busy port), which nothing should restart."""
    setup_logging("gateway")
    install_uvloop()
    exit_with_parent()
    try:
        preflight(config)
        asyncio.run(serve(config))
    except (ValueError, PortBusy) as e:
        logger.error("%s", e)
        return EXIT_CONFIG
    return 0
