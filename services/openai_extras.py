"""The HTTP routes beside the OpenAI API that vLLM users reach for: ``POST /tokenize``,
``POST /detokenize`` and ``GET /version`` (the OpenAPI page is FastAPI's own, at
``/docs``, with the schema at ``/openapi.json``).

Bodies are strict, like the OpenAI ones (an unknown field is a 400 naming it), and go
through the same ``ServingCore`` as generation: the same tokenizer replicas, the same
chat template, the same model names.

    POST /tokenize   {"prompt": "..."} or {"messages": [...]} (+ "model",
                     "add_special_tokens", "add_generation_prompt")
                     -> {"count", "max_model_len", "tokens", "text"}
    POST /detokenize {"tokens": [...]} (+ "model", "skip_special_tokens") -> {"prompt"}
    GET  /version    -> {"version"}
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tessera.services.core import ChatPrompt, ErrorKind, RequestError, ServingCore, TextPrompt
from tessera.services.openai_protocol import ChatMessage

_MAX_TOKEN_ID = 2**32 - 1


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=_MAX_TOKEN_ID)]]
    skip_special_tokens: bool = True


def tessera_version() -> str:
    try:
        return version("tessera")
    except PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


def add_extra_routes(app: FastAPI, core: ServingCore) -> None:
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        _check_model(core, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError(ErrorKind.INVALID, "give either prompt or messages", "prompt")
        if body.messages is not None:
            turns = tuple((m.role, m.text(i)) for i, m in enumerate(body.messages))
            prompt: TextPrompt | ChatPrompt = ChatPrompt(turns, body.add_generation_prompt)
            add = bool(body.add_special_tokens)  # the template writes its own BOS
        else:
            prompt = TextPrompt(body.prompt or "")
            add = True if body.add_special_tokens is None else body.add_special_tokens
        ids, text = await core.tokenize(prompt, add_special_tokens=add)
        return JSONResponse({"count": len(ids), "max_model_len": core.info.max_model_len,
                             "tokens": list(ids), "text": text})

    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        _check_model(core, body.model)
        text = await core.detokenize(body.tokens, skip_special_tokens=body.skip_special_tokens)
        return JSONResponse({"prompt": text})

    async def version_route() -> JSONResponse:
        return JSONResponse({"version": tessera_version()})

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/version", version_route, methods=["GET"])


def _check_model(core: ServingCore, model: str | None) -> None:
    if model and not core.serves(model):
        raise RequestError(ErrorKind.UNKNOWN_MODEL, f"the model {model!r} does not exist",
                           "model")
