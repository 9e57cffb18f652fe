"""The tool calls in an assistant message: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks (the Hermes/Qwen format most chat templates with tools use), in order.

Text around the blocks (the model's reasoning) is ignored. A block that cannot be a call (bad
JSON, no name, arguments that are not an object) is kept as a call with a `problem`, so that
the model is told what was wrong. Lenient where models commonly differ: `arguments` given as a
JSON string, text after the call's JSON object inside the block (the first object is the call),
and a last block whose closing tag is missing (a stop string the engine cut off, or the model
went on writing) when what follows its opening tag starts with a complete JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str | None
    arguments: dict = field(default_factory=dict)
    problem: str | None = None  # why it cannot run; None for a well-formed call


def _parse_call(body: str) -> ToolCall:
    try:
        call, _ = json.JSONDecoder().raw_decode(body.strip())  # the first JSON value; the rest ignored
    except ValueError as e:
        return ToolCall(None, problem=f"the tool call is not valid JSON ({e})")
    if not isinstance(call, dict):
        return ToolCall(None, problem='a tool call must be a JSON object with "name" and "arguments"')
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, problem='the tool call has no "name"')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            return ToolCall(name, problem=f'the "arguments" string is not valid JSON ({e})')
    if not isinstance(arguments, dict):
        return ToolCall(name, problem=f'"arguments" must be a JSON object, not {type(arguments).__name__}')
    return ToolCall(name, arguments)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>` block of `text`, in order; [] when there is none (a final answer)."""
    calls, position = [], 0
    while (start := text.find(OPEN, position)) >= 0:
        body_start = start + len(OPEN)
        end = text.find(CLOSE, body_start)
        if end < 0:
            call = _parse_call(text[body_start:])
            if call.problem is not None:
                call = ToolCall(call.name, problem=f"a {OPEN} without its {CLOSE}")
            calls.append(call)
            break
        calls.append(_parse_call(text[body_start:end]))
        position = end + len(CLOSE)
    return calls
