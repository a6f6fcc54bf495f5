"""An HTTP client that leaves while its request is worked on: the work is cancelled.

Every route that waits on the engine before answering (completions, chat, embeddings)
wraps that wait in ``or_disconnect``: if the client closes the connection first, the
work is cancelled, so its sequences are aborted and their KV blocks freed at once,
rather than computed for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


async def or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone (with ``work`` cancelled) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
