"""The tokenizer service process: a grpc.aio server over one model's `Tokenizer`.

Owns the `TokenizerService` servicer (batch Tokenize of text or chat turns, batch
Detokenize, GetTokenizerInfo), the standard `grpc.health.v1` health service and server
reflection, the service's domain types (shared with `tokenizer_svc.client`), and the
process entry `run_tokenizer_server(config)`.

Protobuf is converted to domain types at the edge: each RPC runs
`from_pb -> work -> to_pb` as one call in a small thread pool, so tokenizing a large
batch never holds the event loop (HF tokenizers release the GIL while they work).
Bad input is INVALID_ARGUMENT with a message a person can act on, never INTERNAL; so
are requests that do not parse (a pickle, garbage: ``proto.guard``), which are logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.common.process import exit_with_parent, install_uvloop, process_age, setup_logging
from tessera.common.registry import DEFAULT_MODEL, resolve_model
from tessera.proto.guard import DecodeGuard
from tessera.proto.tessera.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tessera.tokenizer_svc.chat_template import read_chat_template
from tessera.tokenizer_svc.tokenizer import Tokenizer
from tessera.tokenizer_svc.tool_prompt import tool_messages

logger = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Tokenize echoes the text and adds ids, so a response may outgrow its request.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, NUL included

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class TokenizerInputError(ValueError):
    """Input the tokenizer cannot take: an empty chat, a failing chat template, ids
    outside the vocabulary. The server answers INVALID_ARGUMENT with this message."""


# --- domain types --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TextInput:
    text: str
    add_special_tokens: bool = True  # BOS/EOS where the model asks for them


@dataclass(slots=True, frozen=True)
class ChatTurn:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    tool_calls_json: str = ""  # an assistant turn's calls, OpenAI's JSON list
    tool_call_id: str = ""  # a tool turn: the call it answers


@dataclass(slots=True, frozen=True)
class ChatInput:
    messages: tuple[ChatTurn, ...]
    add_generation_prompt: bool = True
    # The template writes its own BOS; True adds the model's special tokens, never a second BOS.
    add_special_tokens: bool = False
    tools_json: str = ""  # the tools offered, OpenAI's JSON list (tokenizer_svc/tool_prompt.py)

    @staticmethod
    def from_messages(
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tools_json: str = "",
    ) -> ChatInput:
        """From OpenAI-style dicts: "role" and "content" (both text) cross the wire, and
        "tool_calls_json" and "tool_call_id" where a turn has them."""
        turns = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerInputError(
                    f"messages[{index}] must be a dict with 'role' and 'content', "
                    f"got {type(message).__name__}"
                )
            extra = sorted(set(message) - {"role", "content", *_TOOL_KEYS})
            if extra:
                raise TokenizerInputError(
                    f"messages[{index}] has keys {extra}; the tokenizer service takes only "
                    "'role' and 'content' (and 'tool_calls_json', 'tool_call_id')"
                )
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise TokenizerInputError(
                    f"messages[{index}] needs 'role' and 'content' as text, got "
                    f"role={role!r}, content of type {type(content).__name__}"
                )
            tools = {key: str(message.get(key) or "") for key in _TOOL_KEYS}
            turns.append(ChatTurn(role, content, **tools))
        return ChatInput(tuple(turns), add_generation_prompt, tools_json=tools_json)


_TOOL_KEYS = ("tool_calls_json", "tool_call_id")


class Tokenized(NamedTuple):
    """A pair, so `ids, text = await client.tokenize_chat(...)` reads naturally."""

    token_ids: list[int]
    text: str  # the text tokenized: the rendered template for chat input


@dataclass(slots=True, frozen=True)
class TokenizerInfo:
    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    has_chat_template: bool


# --- the work, on domain types -------------------------------------------------------------


def tokenize_inputs(
    tokenizer: Tokenizer, inputs: Sequence[TextInput | ChatInput]
) -> list[Tokenized]:
    """Token ids of every input, encoded in batches (one per add_special_tokens value).
    Raises TokenizerInputError."""
    texts = [_render(tokenizer, index, item) for index, item in enumerate(inputs)]
    token_ids: list[list[int]] = [[] for _ in inputs]
    for add_special in (True, False):
        chosen = [i for i, item in enumerate(inputs) if item.add_special_tokens == add_special]
        if not chosen:
            continue
        encoded = tokenizer.encode_batch([texts[i] for i in chosen], add_special)
        for i, ids in zip(chosen, encoded, strict=True):
            token_ids[i] = ids
    bos = tokenizer.bos_token_id
    for item, ids in zip(inputs, token_ids, strict=True):
        if isinstance(item, ChatInput) and bos is not None and ids[:2] == [bos, bos]:
            del ids[0]  # the template wrote BOS and encoding added another
    return [Tokenized(ids, text) for ids, text in zip(token_ids, texts, strict=True)]


def detokenize_inputs(
    tokenizer: Tokenizer, batch: Sequence[list[int]], skip_special_tokens: bool = True
) -> list[str]:
    """Text of every id list. Raises TokenizerInputError on an id outside the vocabulary
    (the backend would silently drop it)."""
    vocab_size = tokenizer.vocab_size
    for index, ids in enumerate(batch):
        if ids and (max(ids) >= vocab_size or min(ids) < 0):
            bad = next(i for i in ids if not 0 <= i < vocab_size)
            raise TokenizerInputError(
                f"inputs[{index}]: token id {bad} is outside the vocabulary of model "
                f"{tokenizer.name!r} (ids 0..{vocab_size - 1})"
            )
    return tokenizer.backend.decode_batch(list(batch), skip_special_tokens=skip_special_tokens)


def tokenizer_info(tokenizer: Tokenizer) -> TokenizerInfo:
    return TokenizerInfo(
        model=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eos_token_ids=tokenizer.eos_token_ids,
        bos_token_id=tokenizer.bos_token_id,
        has_chat_template=tokenizer.chat_template is not None,
    )


def _render(tokenizer: Tokenizer, index: int, item: TextInput | ChatInput) -> str:
    if isinstance(item, TextInput):
        return item.text
    if not item.messages:
        raise TokenizerInputError(f"inputs[{index}]: chat input has no messages")
    for turn, message in enumerate(item.messages):
        if not message.role:
            raise TokenizerInputError(f"inputs[{index}]: messages[{turn}] has an empty role")
    try:
        messages, tools = tool_messages(item.messages, item.tools_json, tokenizer.chat_template)
        return tokenizer.apply_chat_template(messages, item.add_generation_prompt, tools=tools)
    except ValueError as exc:  # ChatTemplateError, or tools that are not JSON
        raise TokenizerInputError(f"inputs[{index}]: {exc}") from exc


# --- protobuf at the edge ------------------------------------------------------------------


def inputs_from_pb(request: tokenizer_pb2.TokenizeBatchRequest) -> list[TextInput | ChatInput]:
    inputs: list[TextInput | ChatInput] = []
    for index, item in enumerate(request.inputs):
        kind = item.WhichOneof("input")
        explicit = item.add_special_tokens if item.HasField("add_special_tokens") else None
        if kind == "text":
            inputs.append(TextInput(item.text, True if explicit is None else explicit))
        elif kind == "chat":
            chat = item.chat
            inputs.append(
                ChatInput(
                    messages=tuple(
                        ChatTurn(m.role, m.content, m.tool_calls_json, m.tool_call_id)
                        for m in chat.messages
                    ),
                    tools_json=chat.tools_json,
                    add_generation_prompt=(
                        chat.add_generation_prompt
                        if chat.HasField("add_generation_prompt")
                        else True
                    ),
                    add_special_tokens=bool(explicit),
                )
            )
        else:
            raise TokenizerInputError(f"inputs[{index}] sets neither 'text' nor 'chat'")
    return inputs


def info_to_pb(info: TokenizerInfo) -> tokenizer_pb2.TokenizerInfo:
    return tokenizer_pb2.TokenizerInfo(
        model=info.model,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        bos_token_id=info.bos_token_id,
        has_chat_template=info.has_chat_template,
    )


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Thin: converts at the edge and runs the work in `pool`."""

    def __init__(self, tokenizer: Tokenizer, pool: ThreadPoolExecutor) -> None:
        self._tokenizer = tokenizer
        self._pool = pool
        self._info = info_to_pb(tokenizer_info(tokenizer))

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeBatchRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeBatchResponse:
        return await self._run(self._tokenize, request, context)

    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeBatchRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeBatchResponse:
        return await self._run(self._detokenize, request, context)

    async def GetTokenizerInfo(
        self, request: tokenizer_pb2.TokenizerInfoRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizerInfo:
        return self._info

    def _tokenize(
        self, request: tokenizer_pb2.TokenizeBatchRequest
    ) -> tokenizer_pb2.TokenizeBatchResponse:
        results = tokenize_inputs(self._tokenizer, inputs_from_pb(request))
        return tokenizer_pb2.TokenizeBatchResponse(
            outputs=[
                tokenizer_pb2.TokenizeOutput(token_ids=r.token_ids, text=r.text) for r in results
            ]
        )

    def _detokenize(
        self, request: tokenizer_pb2.DetokenizeBatchRequest
    ) -> tokenizer_pb2.DetokenizeBatchResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        batch = [list(item.ids) for item in request.inputs]
        return tokenizer_pb2.DetokenizeBatchResponse(
            texts=detokenize_inputs(self._tokenizer, batch, skip)
        )

    async def _run(
        self,
        work: Callable[[_Request], _Response],
        request: _Request,
        context: grpc.aio.ServicerContext,
    ) -> _Response:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work, request)
        except TokenizerInputError as exc:
            logger.debug("invalid input: %s", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


# --- the process ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TokenizerServerConfig:
    model: str = DEFAULT_MODEL  # a name, a .gguf file or a Hugging Face directory
    address: str = "127.0.0.1:50061"  # host:port (port 0 picks one) or unix:/path
    max_workers: int = 2  # threads that tokenize; HF tokenizers also parallelize batches
    grace_seconds: float = 5.0  # in-flight calls may finish this long after SIGTERM
    chat_template: str | None = None  # a template, or a file holding one: replaces the model's

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"TokenizerServerConfig.model must name a model, got {self.model!r}")
        check_address(self.address)
        workers = self.max_workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(
                f"TokenizerServerConfig.max_workers must be a positive int, got {workers!r}"
            )
        grace = self.grace_seconds
        if not isinstance(grace, int | float) or not math.isfinite(grace) or grace < 0:
            raise ValueError(
                f"TokenizerServerConfig.grace_seconds must be a finite number >= 0, got {grace!r}"
            )


def check_address(address: str) -> None:
    """Accept `host:port` (IPv6 as `[::1]:port`) or `unix:/path`; ValueError otherwise."""
    if not isinstance(address, str):
        raise ValueError(f"an address must be text, got {address!r}")
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if not path:
            raise ValueError(f"address {address!r} names no socket path (use unix:/path)")
        if len(path.removeprefix("//").encode()) > _UNIX_PATH_MAX:
            raise ValueError(
                f"unix socket path in {address!r} is longer than {_UNIX_PATH_MAX} bytes; "
                "choose a shorter path"
            )
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} is neither host:port (port 0..65535) nor unix:/path")


def _unix_path(address: str) -> str:
    path = address.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path  # unix:///abs and unix:/abs


def _refuse_live_socket(path: str) -> None:
    """gRPC replaces a socket file that exists; refuse if a live server still answers there
    (a stale file from a killed replica is fine)."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return
    raise OSError(f"cannot listen on unix:{path}: another process is listening there")


def load_tokenizer(model: str, chat_template: str | None = None) -> Tokenizer:
    """The model's tokenizer, with ``chat_template`` (text, or a file holding it) in place
    of its own; ValueError if the model names nothing or has no tokenizer (random weights)."""
    tokenizer = Tokenizer.load(resolve_model(model))
    if tokenizer is None:
        raise ValueError(
            f"model {model!r} has random weights and no tokenizer; serve a GGUF file or a "
            "Hugging Face directory"
        )
    if chat_template is not None:
        tokenizer = dataclasses.replace(tokenizer, chat_template=read_chat_template(chat_template))
    return tokenizer


def run_tokenizer_server(config: TokenizerServerConfig) -> None:
    """The process entry: serve `config.model` on `config.address` until SIGTERM or SIGINT
    (or the parent's death), then stop within `config.grace_seconds`. Raises ValueError
    for a model that cannot be loaded, OSError for an address it cannot listen on."""
    setup_logging("tokenizer")
    install_uvloop()
    exit_with_parent()
    # Loaded before listening: until then connections are refused, so clients and
    # health probes move on to other replicas.
    tokenizer = load_tokenizer(config.model, config.chat_template)
    asyncio.run(_serve(config, tokenizer))


def grpc_server(
    tokenizer: Tokenizer, pool: ThreadPoolExecutor
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The replica's server, not yet bound: the tokenizer service, health and reflection,
    behind the decode guard (undecodable requests: INVALID_ARGUMENT, logged)."""
    server = grpc.aio.server(
        interceptors=[DecodeGuard()],
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            # A second replica on a taken port is an error, not a silent share of it.
            ("grpc.so_reuseport", 0),
        ],
    )
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
        TokenizerServicer(tokenizer, pool), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer


async def _serve(config: TokenizerServerConfig, tokenizer: Tokenizer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(config.max_workers, thread_name_prefix="tokenize") as pool:
        server, health_servicer = grpc_server(tokenizer, pool)
        listening = _listen(server, config.address)
        await server.start()
        for service in (health.OVERALL_HEALTH, SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving the tokenizer of %s on %s (ready %.1fs after start)",
                    tokenizer.name, listening, process_age())
        await stop.wait()
        logger.info("stopping; in-flight calls have %.1fs to finish", config.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_seconds)
    logger.info("stopped")


def _listen(server: grpc.aio.Server, address: str) -> str:
    """Bind `address`; return it with the port the OS picked when it asked for port 0."""
    if address.startswith("unix:"):
        _refuse_live_socket(_unix_path(address))
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc} (is another process using it?)") from exc
    if address.startswith("unix:"):
        return address
    return f"{address.rpartition(':')[0]}:{port}"


__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "SERVICE_NAME",
    "ChatInput",
    "ChatTurn",
    "TextInput",
    "Tokenized",
    "TokenizerInfo",
    "TokenizerInputError",
    "TokenizerServerConfig",
    "TokenizerServicer",
    "check_address",
    "detokenize_inputs",
    "run_tokenizer_server",
    "tokenize_inputs",
]
