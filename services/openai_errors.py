"""OpenAI's error shape on the HTTP API, and the HTTP status of each failure.

Owns the mapping from a ``RequestError``'s kind to a status, an OpenAI error ``type`` and
``code`` (``ERROR_STATUS``, also used for the error event of a stream whose status is
already sent); the JSON error responses, with Retry-After on 429 and 503; and the FastAPI
exception handlers that turn every error a route raises into that shape
(``install_error_handlers``).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tessera.services.core import ErrorKind, RequestError
from tessera.services.openai_protocol import error_body

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
ERROR_STATUS = {
    ErrorKind.INVALID: (400, "invalid_request_error", None),
    ErrorKind.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorKind.INTERNAL: (500, "server_error", None),
}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None
    return JSONResponse(error_body(message, type_, param, code), status, headers=headers)


def request_error_response(e: RequestError) -> JSONResponse:
    status, type_, code = ERROR_STATUS[e.kind]
    return error_response(status, e.message, type_, e.param, code)


def validation_response(e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None
    elif param is None:
        message = "the body must be a JSON object with the request's fields"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return error_response(400, message, "invalid_request_error", param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error a route raises in OpenAI's error shape."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return request_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_response(e)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "unknown_url"
        else:
            message, code = str(e.detail), None
        return error_response(e.status_code, message, "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the gateway's log", "server_error")
