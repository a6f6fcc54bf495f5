"""`TokenizerClient`: asyncio client of N tokenizer replicas, for the gateway.

Owns spreading calls over the replicas and riding over their failures. Calls go round
robin, one grpc.aio channel per replica. A call that fails on a replica with
UNAVAILABLE or DEADLINE_EXCEEDED (a stopped or unreachable replica) marks that replica
down for `backoff_seconds` and is retried on the next one. Replicas in back-off are
tried last, not skipped: a call fails only when every replica has failed it, and a
replica that came back is used again once its back-off ends. Every call is stateless
on the server, so a retry is always safe.

Each attempt gets an equal share of what is left of `timeout`, so one hung replica
cannot eat the whole budget. Errors: INVALID_ARGUMENT -> `TokenizerInputError`
(a ValueError, with the server's message), and so is RESOURCE_EXHAUSTED (a message
over the size limit); no replica answered -> `TokenizerUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tessera.common.request_fields import is_valid_text
from tessera.proto.tessera.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tessera.tokenizer_svc.server import (
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    ChatInput,
    TextInput,
    Tokenized,
    TokenizerInfo,
    TokenizerInputError,
    check_address,
)

logger = logging.getLogger(__name__)

_FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    # gRPC's reconnect back-off grows to 120 s by default; a restarted replica should
    # be back in rotation within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A "dns:///tokenizer:50061" address (compose --scale, a Kubernetes headless
    # service) resolves to every replica: spread calls over all of them.
    ("grpc.lb_policy_name", "round_robin"),
]

Stub = tokenizer_pb2_grpc.TokenizerServiceStub


class TokenizerUnavailable(RuntimeError):
    """No tokenizer replica answered (all stopped, unreachable or too slow)."""


@dataclass(slots=True)
class _Replica:
    address: str
    channel: grpc.aio.Channel | None = None  # opened on first use, inside the event loop
    stub: Stub | None = None
    down_until: float = 0.0  # loop time; tried last until then


class TokenizerClient:
    """Calls tokenizer replicas at `addresses` (`host:port` or `unix:/path`).

    Create and use it inside one running event loop; `close()` it (or use
    `async with`) when done.
    """

    def __init__(
        self, addresses: Sequence[str], timeout: float = 10.0, backoff_seconds: float = 1.0
    ) -> None:
        if isinstance(addresses, str) or not addresses:
            raise ValueError(f"TokenizerClient needs a list of addresses, got {addresses!r}")
        for address in addresses:
            check_address(address)
        if not timeout > 0:
            raise ValueError(f"TokenizerClient timeout must be > 0 seconds, got {timeout!r}")
        if not backoff_seconds >= 0:
            raise ValueError(
                f"TokenizerClient backoff_seconds must be >= 0, got {backoff_seconds!r}"
            )
        self._replicas = [_Replica(address) for address in addresses]
        self._timeout = timeout
        self._backoff = backoff_seconds
        self._next = 0  # round-robin position

    # --- the API ---------------------------------------------------------------------------

    async def tokenize(self, inputs: Sequence[TextInput | ChatInput]) -> list[Tokenized]:
        """Token ids of every input, in one call."""
        request = tokenizer_pb2.TokenizeBatchRequest(
            inputs=[_input_to_pb(index, item) for index, item in enumerate(inputs)]
        )
        response = await self._call(lambda stub: stub.Tokenize, request)
        return [Tokenized(list(out.token_ids), out.text) for out in response.outputs]

    async def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        (result,) = await self.tokenize([TextInput(text, add_special_tokens)])
        return result.token_ids

    async def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tools_json: str = "",
    ) -> Tokenized:
        """The chat rendered with the model's template, and its token ids (no extra BOS)."""
        chat = ChatInput.from_messages(messages, add_generation_prompt, tools_json)
        (result,) = await self.tokenize([chat])
        return result

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        (text,) = await self.detokenize_batch([token_ids], skip_special_tokens)
        return text

    async def detokenize_batch(
        self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        try:
            inputs = [generate_pb2.TokenIds(ids=ids) for ids in batch]
        except (ValueError, TypeError) as exc:
            raise TokenizerInputError(f"token ids must be ints in [0, 2**32): {exc}") from None
        request = tokenizer_pb2.DetokenizeBatchRequest(
            inputs=inputs, skip_special_tokens=skip_special_tokens
        )
        response = await self._call(lambda stub: stub.Detokenize, request)
        return list(response.texts)

    async def info(self) -> TokenizerInfo:
        pb = await self._call(
            lambda stub: stub.GetTokenizerInfo, tokenizer_pb2.TokenizerInfoRequest()
        )
        return TokenizerInfo(
            model=pb.model,
            vocab_size=pb.vocab_size,
            eos_token_ids=tuple(pb.eos_token_ids),
            bos_token_id=pb.bos_token_id if pb.HasField("bos_token_id") else None,
            has_chat_template=pb.has_chat_template,
        )

    async def close(self) -> None:
        for replica in self._replicas:
            if replica.channel is not None:
                await replica.channel.close()
            replica.channel, replica.stub = None, None

    async def __aenter__(self) -> TokenizerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- spreading and failover ------------------------------------------------------------

    async def _call(
        self, method: Callable[[Stub], Callable[..., Awaitable[Any]]], request: Any
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        order = self._order(loop.time())
        failures: list[str] = []
        for position, replica in enumerate(order):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                response = await method(self._stub(replica))(
                    request, timeout=remaining / (len(order) - position)
                )
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise TokenizerInputError(details) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a message over the size limit
                    raise TokenizerInputError(
                        f"request or response too large ({details}); send smaller batches"
                    ) from None
                if code not in _FAILOVER_CODES:
                    raise RuntimeError(
                        f"tokenizer replica {replica.address} failed: {code.name}: {details}"
                    ) from exc
                # Warn when a replica goes down, not on every retry while it stays down.
                log = logger.warning if replica.down_until == 0.0 else logger.debug
                log("tokenizer replica %s is down: %s %s", replica.address, code.name, details)
                replica.down_until = loop.time() + self._backoff
                failures.append(f"{replica.address}: {code.name} {details}")
                continue
            replica.down_until = 0.0
            return response
        raise TokenizerUnavailable(
            f"no tokenizer replica answered within {self._timeout}s; tried "
            + ("; ".join(failures) or "none")
        )

    def _order(self, now: float) -> list[_Replica]:
        """Every replica once: round robin from the next position, those in back-off last
        (soonest back first)."""
        count = len(self._replicas)
        start, self._next = self._next, (self._next + 1) % count
        rotated = self._replicas[start:] + self._replicas[:start]
        return sorted(rotated, key=lambda r: 0.0 if r.down_until <= now else r.down_until)

    def _stub(self, replica: _Replica) -> Stub:
        if replica.stub is None:
            replica.channel = grpc.aio.insecure_channel(replica.address, options=_CHANNEL_OPTIONS)
            replica.stub = Stub(replica.channel)
        return replica.stub


def _input_to_pb(index: int, item: TextInput | ChatInput) -> tokenizer_pb2.TokenizeInput:
    """The input as protobuf; TokenizerInputError naming the field for text that protobuf
    cannot carry (an unpaired surrogate is not UTF-8), instead of a UnicodeEncodeError."""
    if isinstance(item, TextInput):
        _check_text(f"inputs[{index}].text", item.text)
        return tokenizer_pb2.TokenizeInput(
            text=item.text, add_special_tokens=item.add_special_tokens
        )
    for turn, m in enumerate(item.messages):
        _check_text(f"inputs[{index}].messages[{turn}].role", m.role)
        _check_text(f"inputs[{index}].messages[{turn}].content", m.content)
    chat = generate_pb2.ChatMessages(
        messages=[
            generate_pb2.ChatMessage(
                role=m.role,
                content=m.content,
                tool_calls_json=m.tool_calls_json,
                tool_call_id=m.tool_call_id,
            )
            for m in item.messages
        ],
        add_generation_prompt=item.add_generation_prompt,
        tools_json=item.tools_json,
    )
    return tokenizer_pb2.TokenizeInput(chat=chat, add_special_tokens=item.add_special_tokens)


def _check_text(name: str, text: str) -> None:
    if isinstance(text, str) and not is_valid_text(text):
        raise TokenizerInputError(f"{name} is not valid Unicode (it holds an unpaired surrogate)")


__all__ = [
    "ChatInput",
    "TextInput",
    "Tokenized",
    "TokenizerClient",
    "TokenizerInfo",
    "TokenizerInputError",
    "TokenizerUnavailable",
]
