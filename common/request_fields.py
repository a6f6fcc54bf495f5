"""What the two public APIs check alike beyond the sampling fields, declared once.

``sampling_fields`` declares the scalar sampling settings; this module holds the rest of
the validation both fronts share, so that a request means the same on gRPC and on HTTP:

- chat roles: ``CHAT_ROLES``, and ``ROLE_ALIASES`` (OpenAI's "developer" is the system
  turn). ``chat_role`` checks one turn's role; the gateway's core calls it for chats from
  either front, so "wizard" is refused alike (issue 19).
- text: every string a client sends must be valid Unicode. A JSON body may spell a lone
  surrogate (``"\\ud800"``), which Python decodes into a ``str`` that no UTF-8 encoder
  takes, so it fails deep inside (a protobuf field, a response body) as a 500.
  ``invalid_text`` finds such a string, key or value, anywhere in a decoded JSON body and
  names where it is; the HTTP edge refuses the request with that name. On gRPC, protobuf
  itself refuses a string field that is not UTF-8, and ``proto.guard`` names the field.
"""

from __future__ import annotations

from typing import Any

CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


def chat_role(index: int, role: str) -> str:
    """The role of turn ``index`` as the chat template takes it; ValueError naming the
    turn and the roles allowed otherwise."""
    if role in CHAT_ROLES:
        return role
    if role in ROLE_ALIASES:
        return ROLE_ALIASES[role]
    allowed = ", ".join(CHAT_ROLES) + f" or {', '.join(ROLE_ALIASES)}"
    if not role:
        raise ValueError(f"messages[{index}] has an empty role; use {allowed}")
    raise ValueError(f"messages[{index}].role must be {allowed}, got {ascii(role)}")


def is_valid_text(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8: no unpaired surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text(value: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string in a decoded JSON value, key
    or value, that is not valid Unicode; None if every one is. A bad key is named as
    ``parent[key]`` with the key in ASCII escapes, so the name itself can be sent back."""
    if isinstance(value, str):
        return None if is_valid_text(value) else (path or "the body")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not is_valid_text(key):
                return f"{path}[{ascii(key)}]" if path else f"the key {ascii(key)}"
            found = invalid_text(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = invalid_text(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None
