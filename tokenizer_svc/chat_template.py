"""Chat templates: rendering a model's Jinja template over a conversation, sandboxed.

Templates come with model files, so they are untrusted code. They run in Jinja's
`ImmutableSandboxedEnvironment` (no underscore attributes, no mutation of inputs),
made to fail at once on an unsafe attribute access,
with the helpers Hugging Face templates expect: `raise_exception`, `strftime_now`,
a JSON `tojson` that does not HTML-escape, `namespace` (rejecting underscore
names), `dict`, `{% generation %}` blocks and loop controls.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, unsafe, or raised an error while rendering."""


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render `template` over `messages`; `variables` (add_generation_prompt, bos_token, ...)
    are visible to the template as globals. Raises ChatTemplateError."""
    try:
        return _compile(template).render(messages=messages, **variables)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing on the first unsafe attribute access (Jinja
    itself renders it as an empty string and fails only when it is used further)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


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
