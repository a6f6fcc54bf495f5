"""``POST /v1/embeddings``, OpenAI's embeddings route, over ``ServingCore.embed``.

    {"model", "input": str | [str] | [int] | [[int]], "encoding_format": "float" |
     "base64", "dimensions", "user", "normalize" (an extra field, default true)}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
        "model", "usage": {"prompt_tokens", "total_tokens"}}

A vector is the mean of the model's final-norm hidden state over every position of its
input, L2-normalised as OpenAI's and vLLM's are (``normalize: false`` gives the raw
mean); base64 is the vector's little-endian float32 bytes, as OpenAI sends them (the
openai client asks for base64 by default and decodes it). ``dimensions`` is accepted
only equal to the hidden size: nothing is truncated. The body is strict like the others
(an unknown field is a 400 naming it); an empty or too long input is a 400, an unknown
model a 404.

Every input of a call becomes one embed sequence of one AddRequests: the scheduler runs
their prompts in the same batches as the generating requests (no separate batch), each
finishing after its last prefill chunk. A client that closes the connection first
cancels the call, and its unfinished sequences are aborted (services/http_disconnect.py).
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from tessera.common.embeddings import to_base64
from tessera.services.core import ServingCore, TextPrompt, TokenPrompt
from tessera.services.http_disconnect import ClientGone, or_disconnect
from tessera.services.openai_protocol import TokenId


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # OpenAI's end-user tag: accepted, not used
    normalize: bool = True  # not OpenAI's: false returns the raw mean

    def prompts(self) -> list[TextPrompt | TokenPrompt]:
        """The inputs as the core's prompts (empty for an empty list)."""
        items = [self.input] if isinstance(self.input, str) else self.input
        if items and all(isinstance(x, int) for x in items):  # one input of token ids
            return [TokenPrompt(tuple(items))]  # type: ignore[arg-type]
        return [TextPrompt(x) if isinstance(x, str) else TokenPrompt(tuple(x)) for x in items]


def add_embeddings_route(app: FastAPI, core: ServingCore) -> None:
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        try:  # a client that leaves cancels the call: its sequences are aborted
            result = await or_disconnect(request, core.embed(
                body.prompts(), body.model, normalize=body.normalize, dimensions=body.dimensions
            ))  # fmt: skip
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed"
        encode = to_base64 if body.encoding_format == "base64" else list
        data = [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(result.vectors)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
