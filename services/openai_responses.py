"""The bodies of /v1/completions and /v1/chat/completions, whole or streamed.

Owns what goes on the wire once a request's generations produce deltas: the choices a
non-streaming response collects (``Choice``), the two formats that shape them into
OpenAI's bodies, as one JSON response or as server-sent events (``ChatFormat``,
``CompletionFormat``, over ``Format``: the envelope, the usage chunk, the error event
that replaces a status already sent, and ``[DONE]``), and the streaming response that
closes the generations however the stream ends (``EventStream``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, StreamingResponse

from tessera.common.plan import TokenLogprobs
from tessera.services.core import (
    Delta,
    ErrorKind,
    GenerationRequest,
    RequestError,
    TextPrompt,
    TokenPrompt,
)
from tessera.services.openai_errors import ERROR_STATUS
from tessera.services.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    usage_body,
)
from tessera.services.openai_tools import Event, StreamSplitter, parse_tool_calls

if TYPE_CHECKING:
    from tessera.services.openai_api import OpenAIFront


@dataclass(slots=True)
class Choice:
    """One choice of a response being collected."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: Delta | None = None


class EventStream(StreamingResponse):
    """Server-sent events whose generations are closed however the stream ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# -- the two response formats --------------------------------------------------------------


async def _chain(
    first: tuple[int, Delta] | None, rest: AsyncIterator[tuple[int, Delta]]
) -> AsyncIterator[tuple[int, Delta]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"


class Format:
    """What differs between chat and completions: the bodies."""

    object_name = ""
    chunk_name = ""

    def __init__(self, front: OpenAIFront, body: Any, rid: str) -> None:
        self.front = front
        self.rid = rid
        self.n = body.n or 1
        self.include_usage = body.include_usage
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created,
                "model": self.front.core.model, "system_fingerprint": None, "choices": choices}

    def response(self, choices: dict[int, Choice], usage: tuple[int, int, int]) -> JSONResponse:
        body = self.envelope(self.object_name, [self.choice(i, c) for i, c in choices.items()])
        body["usage"] = usage_body(*usage)
        return JSONResponse(body)

    def chunk(self, choices: list[dict[str, Any]]) -> str:
        body = self.envelope(self.chunk_name, choices)
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    async def events(
        self, first: tuple[int, Delta] | None, deltas: AsyncIterator[tuple[int, Delta]]
    ) -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = cached_tokens = 0
        for chunk in self.opening():
            yield chunk
        try:
            async for g, d in _chain(first, deltas):
                if d.finish_reason == "error":
                    raise RequestError(d.error_kind or ErrorKind.INTERNAL, d.error)
                for chunk in self.delta_chunks(g * self.n + d.index, d):
                    yield chunk
                if d.usage is not None:
                    prompt_tokens += d.usage.prompt_tokens
                    completion_tokens += d.usage.completion_tokens
                    cached_tokens += d.usage.cached_tokens
        except RequestError as e:  # the status is sent already: the error is an event
            _, type_, code = ERROR_STATUS[e.kind]
            yield _sse(error_body(e.message, type_, e.param, code))
        else:
            if self.include_usage:
                body = self.envelope(self.chunk_name, [])
                body["usage"] = usage_body(prompt_tokens, completion_tokens, cached_tokens)
                yield _sse(body)
        yield _sse("[DONE]")

    def opening(self) -> list[str]:
        return []

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        raise NotImplementedError


class ChatFormat(Format):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(self, front: OpenAIFront, body: ChatCompletionRequest, rid: str) -> None:
        super().__init__(front, body, rid)
        self.logprobs = bool(body.logprobs)
        # With tools offered, <tool_call> blocks become tool_calls (services/openai_tools.py).
        self.tool_names = frozenset(t.function.name for t in body.offered_tools())
        self.tools = bool(self.tool_names)
        self.splitters: dict[int, StreamSplitter] = {}

    def _logprobs(self, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        return {"content": chat_logprobs(lps, self.front.speller)} if self.logprobs else None

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
        finish_reason = c.finish_reason
        if self.tools:
            content, calls = parse_tool_calls(message["content"], self.tool_names)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(c.logprobs),
            "finish_reason": finish_reason,
        }

    def opening(self) -> list[str]:
        return [
            self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}])
            for i in range(self.n)
        ]

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        text, finish_reason = d.text or "", d.finish_reason
        if not self.tools:
            events: list[Event] = [("content", text)] if text else []
        else:
            splitter = self.splitters.setdefault(index, StreamSplitter(self.tool_names))
            events = splitter.feed(text)
            if finish_reason:
                events += splitter.finish()
                if splitter.num_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
        out = []
        logprobs = self._logprobs(d.logprobs) if d.logprobs else None
        if logprobs is not None and not any(e[0] == "content" for e in events):
            events.insert(0, ("content", ""))  # the step's logprobs ride on a content delta
        for event in events:
            if event[0] == "content":
                delta: dict[str, Any] = {"content": event[1]}
            elif event[0] == "call":  # OpenAI's shape: index, id, type, name, empty arguments
                _, i, call_id, name = event
                delta = {"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                         "function": {"name": name, "arguments": ""}}]}
            else:
                delta = {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}
            out.append(self.chunk([{"index": index, "delta": delta,
                                    "logprobs": logprobs if event[0] == "content" else None,
                                    "finish_reason": None}]))
            if event[0] == "content":
                logprobs = None  # once per step
        if finish_reason:
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None,
                                    "finish_reason": finish_reason}]))
        return out


class CompletionFormat(Format):
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, front: OpenAIFront, body: CompletionRequest, rid: str,
                 requests: list[GenerationRequest]) -> None:
        super().__init__(front, body, rid)
        self.logprobs = body.logprobs is not None
        self.echo = [self._prompt_text(r) for r in requests] if body.echo else None
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def _prompt_text(self, r: GenerationRequest) -> str:
        if isinstance(r.prompt, TextPrompt):
            return r.prompt.text
        tokenizer = self.front.core.tokenizer
        if isinstance(r.prompt, TokenPrompt) and tokenizer is not None:
            return tokenizer.decode(list(r.prompt.token_ids))
        return ""

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def _logprobs(self, index: int, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        body, self.offsets[index] = completion_logprobs(
            lps, self.front.speller, self.offsets.get(index, len(self._echo(index)))
        )
        return body

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        return {
            "index": index,
            "text": self._echo(index) + "".join(c.text),
            "logprobs": self._logprobs(index, c.logprobs),
            "finish_reason": c.finish_reason,
        }

    def opening(self) -> list[str]:
        if self.echo is None:
            return []
        return [
            self.chunk([{"index": i, "text": self._echo(i), "logprobs": None,
                         "finish_reason": None}])
            for i in range(len(self.echo) * self.n)
        ]

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        if not (d.text or d.logprobs or d.finish_reason):
            return []
        return [self.chunk([{"index": index, "text": d.text or "",
                             "logprobs": self._logprobs(index, d.logprobs),
                             "finish_reason": d.finish_reason}])]
