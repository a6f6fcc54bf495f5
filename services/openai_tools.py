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
  "tool_calls". Streamed (``StreamSplitter``), each call goes out as OpenAI streams one:
  a ``tool_calls`` delta with its index, id and name, then its arguments in fragments as
  the model writes them; text outside the blocks is content, and a block that does not
  parse stays content. Llama 3's form (the whole output one JSON object naming an
  offered tool, with "parameters") is a call too; streamed, an output that starts with
  "{" is held to its end to tell.
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


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')

Event = tuple  # ("content", text) | ("call", index, id, name) | ("arguments", index, text)


class StreamSplitter:
    """One streamed choice's text, cut into events as OpenAI streams a choice: content,
    then for each ``<tool_call>`` block a call (index, id, name) and its arguments in
    fragments, sent as they are written.

    A block goes out as it is written once it reads ``{"name": "...", "arguments": {``
    (Hermes order, as the grammar of a forced call writes it): the arguments text streams
    with only its possible end held back (the object's closing brace, whitespace, a
    partial ``</tool_call>``). A block written otherwise is parsed when it closes, and sent
    whole if it parses, else as content, as the non-streamed answer does. A block whose
    start streamed but whose end does not parse cannot be taken back: its call keeps the
    arguments as written. Text between and after calls is content, whitespace only
    dropped. With ``names`` (the offered tools), an output that starts with "{" or
    Llama 3's tag is held to its end and parsed as Llama 3's JSON call."""

    def __init__(self, names: set[str] | frozenset[str] = frozenset()) -> None:
        self.names = names
        self.held = ""  # text not yet decided on, in the current state
        self.state = "text"  # "text" | "block" (before its header) | "arguments" | "whole"
        self.started = False  # some content went out: no longer a whole-JSON call
        self.num_calls = 0
        self._sent = 0  # characters of the current block's arguments already sent

    def feed(self, text: str) -> list[Event]:
        """The events that ``text``, appended to what came before, decides."""
        self.held += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The events still to send once the choice has ended."""
        events = self.feed("")
        held, self.held = self.held, ""
        if self.state == "whole":
            content, calls = parse_tool_calls(held, self.names)
            if calls:
                for call in calls:
                    events += self._whole_call(call)
            elif content:
                events.append(("content", content))
        elif self.state == "block":  # never closed: it stays text, as unparsed
            events.append(("content", CALL_OPEN + held))
        elif self.state == "arguments":  # cut off (length): send what was written
            end = len(held[: len(held) - _partial_prefix(held, CALL_CLOSE)].rstrip())
            if end > self._sent:
                events.append(("arguments", self.num_calls - 1, held[self._sent : end]))
        elif held and not (self.num_calls and not held.strip()):
            events.append(("content", held))
        return events

    def _step(self, events: list[Event]) -> bool:
        """Decide what the held text allows; whether to look again (the state changed)."""
        if self.state == "text":
            return self._text(events)
        if self.state == "block":
            return self._block(events)
        if self.state == "arguments":
            return self._arguments(events)
        return False  # "whole": decided at the end

    def _text(self, events: list[Event]) -> bool:
        buffer = self.held
        head = buffer.lstrip()
        if not self.started and not self.num_calls and self.names and head:
            if head.startswith(("{", PYTHON_TAG)):  # may be Llama 3's JSON call: hold it all
                self.state = "whole"
                return False
            if PYTHON_TAG.startswith(head):  # perhaps the start of the tag: wait
                return False
        start = buffer.find(CALL_OPEN)
        if start >= 0:
            self._content(events, buffer[:start])
            self.held, self.state = buffer[start + len(CALL_OPEN) :], "block"
            return True
        keep = _partial_prefix(buffer)  # a "<tool" at the end may open a call
        out = buffer[: len(buffer) - keep]
        if self.num_calls and not out.strip():  # whitespace after a call: wait and see
            return False
        self.held = buffer[len(out) :]
        self._content(events, out)
        return False

    def _content(self, events: list[Event], text: str) -> None:
        if self.num_calls and not text.strip():
            return
        if text:
            events.append(("content", text))
            self.started = self.started or bool(text.strip())

    def _block(self, events: list[Event]) -> bool:
        body = self.held
        close = body.find(CALL_CLOSE)
        header = _HEADER.match(body, 0, close if close >= 0 else len(body))
        if header is not None:
            try:
                name = json.loads(header.group(1))
            except ValueError:
                name = None
            if isinstance(name, str):
                events.append(("call", self.num_calls, f"call_{uuid.uuid4().hex[:24]}", name))
                self.num_calls += 1
                self.held, self._sent, self.state = body[header.end() :], 0, "arguments"
                return True
        if close < 0:
            return False
        call = _call(body[:close].strip())
        if call is not None:
            events += self._whole_call(call)
        else:
            self._content(events, CALL_OPEN + body[: close + len(CALL_CLOSE)])
        self.held, self.state = body[close + len(CALL_CLOSE) :], "text"
        return True

    def _arguments(self, events: list[Event]) -> bool:
        text = self.held
        close = text.find(CALL_CLOSE)
        end = text[: close if close >= 0 else len(text) - _partial_prefix(text, CALL_CLOSE)]
        end = end.rstrip()
        end = end[:-1].rstrip() if end.endswith("}") else end  # the call object's own brace
        if len(end) > self._sent:
            events.append(("arguments", self.num_calls - 1, end[self._sent :]))
            self._sent = len(end)
        if close < 0:
            return False
        self.held, self.state = text[close + len(CALL_CLOSE) :], "text"
        return True

    def _whole_call(self, call: dict[str, Any]) -> list[Event]:
        index, self.num_calls = self.num_calls, self.num_calls + 1
        function = call["function"]
        return [("call", index, call["id"], function["name"]),
                ("arguments", index, function["arguments"])]


def _partial_prefix(text: str, tag: str = CALL_OPEN) -> int:
    """How many characters at the end of ``text`` may begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
