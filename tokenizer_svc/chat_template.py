"""Chat templates: rendering a model's Jinja template over a conversation, sandboxed.

Templates come with model files, so they are untrusted code. They run in Jinja's
`ImmutableSandboxedEnvironment` (no underscore attributes, no mutation of inputs),
made to fail at once on an unsafe attribute access,
with the helpers Hugging Face templates expect: `raise_exception`, `strftime_now`,
a JSON `tojson` that does not HTML-escape, `namespace` (rejecting underscore
names), `dict`, `{% generation %}` blocks and loop controls.

A render has a time limit (`time_limit`, RENDER_TIME_LIMIT_S by default): past it, a
watchdog raises an exception inside the rendering thread (CPython's async exception,
delivered between two bytecodes, so any Python loop stops), and the render fails with a
ChatTemplateError. What one bytecode could do for long in C, repeating a string or
raising to a huge power, is refused up front (`*` and `**` are intercepted, and Jinja's
sandbox caps `range`).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIME_LIMIT_S = 2.0  # real templates render in milliseconds
MAX_PRODUCT_LENGTH = 1 << 20  # items a template's `*` may build (string or list repetition)
MAX_POWER_BITS = 1 << 16  # bits of an integer a template's `**` may build


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, unsafe, or raised an error while rendering."""


class _RenderTimeout(BaseException):
    """Raised inside a render that ran past its time limit (a BaseException, so that no
    `except Exception` on the way out can swallow it)."""


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    time_limit: float = RENDER_TIME_LIMIT_S,
    **variables: Any,
) -> str:
    """Render `template` over `messages`; `variables` (add_generation_prompt, bos_token, ...)
    are visible to the template as globals. Raises ChatTemplateError, also when the render
    takes longer than `time_limit` seconds."""
    try:
        compiled = _compile(template)
        with _time_limit(time_limit):
            return compiled.render(messages=messages, **variables)
    except _RenderTimeout:
        raise ChatTemplateError(
            f"chat template failed: rendering took longer than {time_limit:g}s"
        ) from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _RenderTimeout in this thread if the block runs longer than ``seconds``.

    The watchdog sets the exception only while the block runs (under the lock); on the way
    out, one set but not yet delivered is cleared, so it can never go off later.
    """
    thread_id = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"running": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["running"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    thread_id, ctypes.py_object(_RenderTimeout)
                )

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["running"] = False
            if state["fired"]:  # clear it if it is still pending (NULL: no exception)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing on the first unsafe attribute access (Jinja
    itself renders it as an empty string and fails only when it is used further), and
    refusing products and powers too large to compute."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    if len(seq) * times > MAX_PRODUCT_LENGTH:
                        raise jinja2.exceptions.SecurityError(
                            f"a repetition of more than {MAX_PRODUCT_LENGTH} items"
                        )
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left).bit_length() * right > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(
                    f"a power of more than {MAX_POWER_BITS} bits"
                )
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    env.globals["dict"] = dict
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names, which could reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self`, as in Jinja's Namespace, so `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_public(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set underscore-prefixed attribute {name!r} on a namespace"
        )


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in HF templates):
    rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def read_chat_template(value: str) -> str:
    """``--chat-template``'s value as a template: the text of the file it names, else the
    value itself (a template has a ``{``; a value without one that names no file is a
    mistyped path, and a ValueError says so)."""
    path = Path(os.path.expanduser(value))
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template: no such file: {value} (an inline template "
                         "holds Jinja tags such as {{ }} or {% %})")
    return value
