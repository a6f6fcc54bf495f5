"""The OpenAI wire format: request bodies in, response and chunk bodies out.

Requests are pydantic models that refuse unknown fields (a misspelt parameter is a 400
naming it, not a silent default); ``to_generation`` turns one into the core's domain
``GenerationRequest``s (one per prompt). Responses are plain dicts built here, with
logprobs in the two shapes OpenAI uses: chat (``content[{token, logprob, bytes,
top_logprobs}]``) and completions (``tokens, token_logprobs, top_logprobs,
text_offset``). Engine parameters OpenAI lacks (top_k, min_p, repetition_penalty,
ignore_eos, priority, min_tokens, stop_token_ids, skip_special_tokens, and cache_salt,
the tenant's prefix-cache namespace) are accepted as extra body fields, as the openai
client sends ``extra_body``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tessera.common.constraints import Constraint
from tessera.common.plan import TokenLogprobs
from tessera.common.sampling_fields import PUBLIC
from tessera.common.sampling_params import SamplingParams
from tessera.services.core import (
    ChatPrompt,
    ErrorKind,
    GenerationRequest,
    RequestError,
    TextPrompt,
    TokenPrompt,
    sampling_params,
)
from tessera.services.openai_structured import (
    ResponseFormat,
    StructuredOutputs,
    constraint_of,
)
from tessera.services.openai_tools import (
    Tool,
    ToolCall,
    ToolChoice,
    offered_tools,
    tool_constraint,
    tools_json,
)
from tessera.tokenizer_svc.tokenizer import Tokenizer

MAX_PROMPTS = 64  # prompts in one completions request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_U32 = 2**32 - 1
_I32 = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=_U32)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


# The declared public fields (common/sampling_fields.py) but logprobs, which each endpoint
# takes in its own shape, and the list-valued settings.
_BODY_SAMPLING = (
    *(name for name in PUBLIC if name != "logprobs"),
    "stop", "stop_token_ids", "skip_special_tokens",
)  # fmt: skip


class _SamplingFields(_Strict):
    """Fields both endpoints share: OpenAI's, then the engine's extras."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # range: common.sampling_fields, as on gRPC
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; not used for anything
    # engine extras
    top_k: Annotated[int, Field(ge=-1, le=_I32)] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    priority: Annotated[int, Field(ge=-_I32 - 1, le=_I32)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=_U32)] | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    cache_salt: str | None = None  # the tenant's prefix-cache namespace (generate.proto)
    # structured output (services/openai_structured.py)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra body

    def constraint(self) -> Constraint | None:
        return constraint_of(self.response_format, self.structured_outputs)

    def sampling(self, max_tokens: int | None, logprobs: int | None,
                 defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise RequestError(
                ErrorKind.INVALID, "stream_options is only allowed with stream: true",
                "stream_options",
            )
        kwargs: dict[str, Any] = {
            name: getattr(self, name)
            for name in _BODY_SAMPLING
            if getattr(self, name) is not None
        }
        if self.logit_bias:
            kwargs["logit_bias"] = _logit_bias(self.logit_bias)
        return sampling_params(
            defaults, **kwargs, max_tokens=max_tokens, logprobs=logprobs,
            constraint=self.constraint(),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Annotated[int, Field(le=_U32)] | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None  # only best_of == n (no server-side ranking)
    suffix: str | None = None  # refused unless empty: no fill-in-the-middle

    def to_generation(self, request_id: str, defaults: dict[str, Any] | None = None
                      ) -> list[GenerationRequest]:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError(
                ErrorKind.INVALID, "best_of other than n is not supported", "best_of"
            )
        if self.suffix:
            raise RequestError(ErrorKind.INVALID, "suffix is not supported", "suffix")
        if self.echo and self.logprobs is not None:
            raise RequestError(
                ErrorKind.INVALID,
                "echo with logprobs is not supported: the engine does not compute the "
                "prompt's logprobs",
                "echo",
            )
        params = self.sampling(self.max_tokens, self.logprobs, defaults)
        prompts = _prompts(self.prompt)
        return [
            GenerationRequest(
                prompt=p,
                params=params,
                request_id=f"{request_id}-{i}" if len(prompts) > 1 else request_id,
                model=self.model,
                priority=self.priority or 0,
                cache_salt=self.cache_salt or "",
            )
            for i, p in enumerate(prompts)
        ]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # so an image part gets our message, not pydantic's
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str  # checked by the core, as on gRPC (common.request_fields.chat_role)
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; the chat template does not show names
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls (services/openai_tools.py)
    tool_call_id: str | None = None  # a "tool" turn: the call it answers

    def tool_fields(self) -> tuple[str, str]:
        calls = json.dumps([c.model_dump() for c in self.tool_calls]) if self.tool_calls else ""
        return calls, self.tool_call_id or ""

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(
                    ErrorKind.INVALID,
                    f"messages[{index}]: content parts of type {part.type!r} are not "
                    "supported (text only)",
                    "messages",
                )
            parts.append(part.text)
        return "\n".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Annotated[int, Field(le=_U32)] | None = None
    max_completion_tokens: Annotated[int, Field(le=_U32)] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # engine extra: False continues the last turn
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # default true, as OpenAI's

    def offered_tools(self) -> list[Tool]:
        return offered_tools(self.tools, self.tool_choice)

    def constraint(self) -> Constraint | None:
        forced = tool_constraint(
            self.offered_tools(), self.tool_choice, self.parallel_tool_calls is not False
        )
        structured = super().constraint()
        if forced is not None and structured is not None:
            raise RequestError(
                ErrorKind.INVALID,
                "tool_choice required or a named function cannot be combined with "
                "response_format or structured_outputs",
                "tool_choice",
            )
        return forced or structured

    def to_generation(self, request_id: str, defaults: dict[str, Any] | None = None
                      ) -> list[GenerationRequest]:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(
                ErrorKind.INVALID, "top_logprobs needs logprobs: true", "top_logprobs"
            )
        max_tokens = (
            self.max_completion_tokens if self.max_completion_tokens is not None
            else self.max_tokens
        )
        params = self.sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                               defaults)
        turns = tuple((m.role, m.text(i)) for i, m in enumerate(self.messages))
        fields = tuple(m.tool_fields() for m in self.messages)
        prompt = ChatPrompt(
            turns,
            add_generation_prompt=self.add_generation_prompt,
            tools_json=tools_json(self.offered_tools()),
            tool_fields=fields if any(any(f) for f in fields) else (),
        )
        return [
            GenerationRequest(
                prompt, params, request_id, self.model, self.priority or 0, self.cache_salt or ""
            )
        ]


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise RequestError(
            ErrorKind.INVALID, "logit_bias keys must be token ids", "logit_bias"
        ) from None


def _prompts(prompt: str | list) -> list[TextPrompt | TokenPrompt]:
    if isinstance(prompt, str):
        return [TextPrompt(prompt)]
    if not prompt:
        raise RequestError(ErrorKind.INVALID, "the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [TokenPrompt(tuple(prompt))]
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(
            ErrorKind.INVALID, f"at most {MAX_PROMPTS} prompts per request", "prompt"
        )
    return [TextPrompt(p) if isinstance(p, str) else TokenPrompt(tuple(p)) for p in prompt]


# -- responses ---------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # Prompt tokens served from the prefix cache, as OpenAI reports its own.
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class TokenSpeller:
    """A token id as the text and the bytes logprobs report (cached: a few per step).

    A byte-level BPE token may hold part of a UTF-8 character: its bytes are exact and
    its text is ``bytes:\\xNN...``, as OpenAI writes such tokens.
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer
        self._byte_level = tokenizer is not None and type(tokenizer.backend.decoder).__name__ == (
            "ByteLevel"
        )
        self._special = (
            set(tokenizer.backend.get_added_tokens_decoder()) if tokenizer is not None else set()
        )
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def spell(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            data = self._bytes(token_id)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            hit = self._cache[token_id] = (text, list(data))
        return hit

    def text(self, token_id: int) -> str:
        return self.spell(token_id)[0]

    def _bytes(self, token_id: int) -> bytes:
        tok = self._tokenizer
        if tok is None:
            return f"<{token_id}>".encode()  # no vocabulary: the id is all there is
        piece = tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level:
            table = _byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        return piece.replace("\u2581", " ").encode()


_BYTE_LEVEL: dict[str, int] = {}


def _byte_level_table() -> dict[str, int]:
    """Character -> byte of GPT-2 style byte-level BPE: printable Latin-1 bytes stand
    for themselves, the other 68 are moved, in order, to code points 256 and up."""
    if not _BYTE_LEVEL:
        printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
        moved = 0
        for b in range(256):
            if b in printable:
                _BYTE_LEVEL[chr(b)] = b
            else:
                _BYTE_LEVEL[chr(256 + moved)] = b
                moved += 1
    return _BYTE_LEVEL


# JSON has no -inf; a token the engine ruled out (min_tokens) gets OpenAI's floor instead.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(lps: list[TokenLogprobs], speller: TokenSpeller) -> list[dict[str, Any]]:
    out = []
    for lp in lps:
        text, data = speller.spell(lp.token_id)
        top = []
        for token_id, logprob in lp.top:
            t, d = speller.spell(token_id)
            top.append({"token": t, "logprob": _finite(logprob), "bytes": d})
        out.append(
            {"token": text, "logprob": _finite(lp.logprob), "bytes": data, "top_logprobs": top}
        )
    return out


def completion_logprobs(
    lps: list[TokenLogprobs], speller: TokenSpeller, offset: int
) -> tuple[dict[str, list], int]:
    """The completions shape for ``lps``, and the text offset after them."""
    body: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                             "text_offset": []}
    for lp in lps:
        text = speller.text(lp.token_id)
        body["tokens"].append(text)
        body["token_logprobs"].append(_finite(lp.logprob))
        body["top_logprobs"].append({speller.text(t): _finite(v) for t, v in lp.top})
        body["text_offset"].append(offset)
        offset += len(text)
    return body, offset
