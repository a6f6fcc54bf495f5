"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice`` and
``parallel_tool_calls`` in; ``tool_calls`` out.

- The tool definitions go to the chat template (tokenizer_svc/tool_prompt.py writes
  them into the system turn, Hermes style, for a template that takes none).
- ``tool_choice``: "none" offers no tools; "auto" (the default with tools) lets the model
  answer or call; "required" and a named function are enforced by a grammar constraint
  (common/constraints.py): one ``<tool_call>`` block (or several, with
  ``parallel_tool_calls``) whose JSON is ``{"name", "arguments"}`` with the arguments
  valid against that function's ``parameters`` schema.
- Output: ``<tool_call>`` blocks are parsed into OpenAI's ``tool_calls`` (arguments as
  JSON text), the text around them is the content, and ``finish_reason`` is
  "tool_calls". Streamed, a choice's text is held back from the first ``<tool_call>``
  on (text before it streams as content) and its calls go out as ``tool_calls`` deltas
  when the choice ends; a block that does not parse stays content. Llama 3's form (the
  whole output one JSON object naming an offered tool, with "parameters") is a call
  too; streamed, an output that starts with "{" is held to its end to tell.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tessera.common.constraints import JSON_OPTIONS, Constraint
from tessera.services.core import ErrorKind, RequestError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3's mark before a call, when special tokens are shown
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
MAX_TOOLS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def offered_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools the template is given (none for tool_choice "none"); 400 on a bad pair."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise RequestError(ErrorKind.INVALID, "tool_choice needs tools", "tool_choice")
        return []
    if len(tools) > MAX_TOOLS:
        raise RequestError(ErrorKind.INVALID, f"at most {MAX_TOOLS} tools", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError(ErrorKind.INVALID, "tool names must be unique", "tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise RequestError(
            ErrorKind.INVALID,
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            "tool_choice",
        )
    return [] if choice == "none" else list(tools)


def tools_json(tools: list[Tool]) -> str:
    return json.dumps([t.model_dump(exclude_none=True) for t in tools]) if tools else ""


def tool_constraint(
    tools: list[Tool], choice: ToolChoice | None, parallel: bool
) -> Constraint | None:
    """The grammar that forces a call, for "required" or a named function; else None."""
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema["x-guidance"] = dict(JSON_OPTIONS)  # compact, as common/constraints.py writes JSON
    repeat = ' ("\\n" call)*' if parallel else ""
    grammar = (
        f"start: call{repeat}\n"
        f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\n'
        f"body: %json {json.dumps(schema)}\n"
    )
    return Constraint("grammar", grammar)


def parse_tool_calls(
    text: str, names: set[str] | frozenset[str] = frozenset()
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output. A block whose JSON is not a
    {"name", "arguments"} object is left in the content. Without blocks, an output that is
    one JSON object naming an offered tool (``names``) is a call: Llama 3's JSON form,
    ``{"name": ..., "parameters": {...}}``."""
    if CALL_OPEN not in text and names:
        whole = text.strip().removeprefix(PYTHON_TAG).strip()
        call = _call(whole) if whole.startswith("{") else None
        if call is not None and call["function"]["name"] in names:
            return None, [call]
        return text, []
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _call(body: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments)},
    }


class StreamSplitter:
    """One streamed choice's text: what may go out as content now, and the held-back
    rest from the first ``<tool_call>`` (or a prefix of it at the end) on."""

    def __init__(self, names: set[str] | frozenset[str] = frozenset()) -> None:
        self.names = names
        self.held = ""
        self.holding = False
        self.started = False  # some content went out: no longer a whole-JSON call

    def feed(self, text: str) -> str:
        """The part of ``text`` that is content for sure."""
        if self.holding:
            self.held += text
            return ""
        buffer = self.held + text
        head = buffer.lstrip()
        if not self.started and self.names and head:
            if head.startswith(("{", PYTHON_TAG)):  # may be Llama 3's JSON call: hold it all
                self.holding, self.held = True, buffer
                return ""
            if PYTHON_TAG.startswith(head):  # perhaps the start of the tag: wait
                self.held = buffer
                return ""
        start = buffer.find(CALL_OPEN)
        if start >= 0:
            self.holding, self.held = True, buffer[start:]
            return buffer[:start]
        keep = _partial_prefix(buffer)  # a "<tool" at the end may open a call
        self.held = buffer[len(buffer) - keep :] if keep else ""
        out = buffer[: len(buffer) - keep]
        self.started = self.started or bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, tool calls) once the choice has ended."""
        content, calls = parse_tool_calls(self.held, frozenset() if self.started else self.names)
        self.held = ""
        return content or "", calls


def _partial_prefix(text: str) -> int:
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
