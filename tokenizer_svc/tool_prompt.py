"""Tools in the chat prompt: OpenAI's tool definitions, an assistant's tool calls and the
tool turns that answer them, turned into what the chat template renders.

A template that takes ``tools`` (Llama 3, Qwen2) gets them as it expects: the tool list,
and each turn's ``tool_calls`` (arguments parsed into objects) and ``tool_call_id``. A
template that names no tools (SmolLM2's plain ChatML) would drop them silently, so the
tools are written into the system turn instead, in the Hermes convention the gateway
parses back (services/openai_tools.py): each call one JSON object ``{"name",
"arguments"}`` between ``<tool_call>`` and ``</tool_call>`` lines; earlier calls are
written the same way into their assistant turns, and tool results are wrapped in
``<tool_response>`` tags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class _Turn(Protocol):
    role: str
    content: str
    tool_calls_json: str
    tool_call_id: str


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _calls(turn: _Turn, index: int) -> list[dict[str, Any]]:
    calls = _json(turn.tool_calls_json, f"messages[{index}].tool_calls")
    if not isinstance(calls, list):
        raise ValueError(f"messages[{index}].tool_calls must be a list")
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                pass  # left as the text the client sent
        out.append({**call, "function": function})
    return out


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou can call the functions listed between <tools> and </tools> below "
        "to answer the user.\n<tools>\n"
        f"{listing}\n</tools>\n\nTo call a function, answer with one JSON object per call, "
        f'each on its own between {CALL_OPEN} and {CALL_CLOSE} lines:\n{CALL_OPEN}\n'
        f'{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{CALL_CLOSE}'
    )


def tool_messages(
    turns: Sequence[_Turn], tools_json: str, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The turns as the template's ``messages``, and its ``tools`` (None when the template
    takes none, the tools then being in the system turn). ValueError on malformed JSON."""
    tools = _json(tools_json, "tools") if tools_json else None
    if tools is not None and not isinstance(tools, list):
        raise ValueError("tools must be a list")
    native = template is not None and "tools" in template
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls_json:
            calls = _calls(turn, index)
            if native:
                message["tool_calls"] = calls
            else:
                written = [
                    f"{CALL_OPEN}\n"
                    + json.dumps({"name": c["function"].get("name"),
                                  "arguments": c["function"].get("arguments")})
                    + f"\n{CALL_CLOSE}"
                    for c in calls
                ]
                message["content"] = "\n".join(filter(None, [turn.content, *written]))
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        if turn.role == "tool" and not native:
            message["content"] = f"<tool_response>\n{turn.content}\n</tool_response>"
        messages.append(message)
    if not tools or native:
        return messages, tools or None
    text = tools_system_text(tools)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages, None
