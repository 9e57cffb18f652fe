"""`tools` environments: a user file of plain functions (docs/agentic.md). Every public function
defined in it (or those listed in `TOOLS = [...]`) is a tool; its name, docstring and type hints
give its JSON schema (pydantic builds the arguments' model and its schema; a Google-style
`Args:` section describes the arguments). An optional `setup(item) -> state` runs at reset;
a tool declaring a parameter named `state` receives it (it is not in the schema).

Each step parses the assistant message's `<tool_call>` blocks (tool_calls.py) and runs them in
order, each result coming back as {"role": "tool", "name", "content": str}. A reply without a
call is the final answer: the episode is done. An unknown tool, bad JSON or bad arguments give
an error tool message naming the problem (the model's mistake); a tool that raises gives one
too and sets the step's `error` (the environment's fault, handled by `environment_errors`).

An optional module constant `TOOL_CALL_REWARD = x` is the environment's per-turn reward: paid
once an episode, on the first turn whose calls all ran (a shaping reward that teaches a model to
call the tools at all; once, so calling them again and again earns nothing).
"""

from __future__ import annotations

import inspect
import json
import re
import traceback
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import GenerateJsonSchema

from rollout_workers.environments.tool_calls import ToolCall, parse_tool_calls

STATE = "state"  # the parameter that receives setup(item)'s value
SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns?|Raises|Yields|Examples?|Notes?):\s*$")
ARGS_SECTIONS = ("Args", "Arguments", "Parameters")
ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class ToolDefinitionError(ValueError):
    """A function cannot be a tool (its schema cannot be built)."""


class _ToolJsonSchema(GenerateJsonSchema):
    """Schemas without pydantic's generated titles (tool specs carry names and descriptions)."""

    def field_title_should_be_set(self, schema) -> bool:
        return False

    def generate(self, schema, mode="validation"):
        json_schema = super().generate(schema, mode)
        json_schema.pop("title", None)
        return json_schema


def split_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the description, {argument: its description}) of a Google-style docstring: the text
    before its first section, and the entries of its `Args:` section (more indented lines
    continue an entry)."""
    description, arguments = [], {}
    in_args, current, entry_indent = None, None, None  # in_args None: before any section
    for line in doc.splitlines():
        stripped = line.strip()
        if header := SECTION.match(stripped):
            in_args, current, entry_indent = header.group(1) in ARGS_SECTIONS, None, None
        elif in_args is None:
            description.append(stripped)
        elif in_args and stripped:
            indent = len(line) - len(line.lstrip())
            entry = ARG_LINE.match(stripped)
            if entry and (entry_indent is None or indent <= entry_indent):
                current, entry_indent = entry.group(1).lstrip("*"), indent
                arguments[current] = entry.group(2).strip()
            elif current is not None:
                arguments[current] = f"{arguments[current]} {stripped}".strip()
    return " ".join(" ".join(description).split()), arguments


@dataclass
class Tool:
    name: str
    function: typing.Callable
    arguments: type[BaseModel]  # validates (and coerces) the model's arguments
    takes_state: bool
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}

    @classmethod
    def from_function(cls, function) -> Tool:
        name = function.__name__
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except Exception as e:  # noqa: BLE001 - a hint naming something undefined, ...
            raise ToolDefinitionError(f"tool {name}: its type hints cannot be resolved: {e}") from None
        description, argument_docs = split_docstring(inspect.getdoc(function) or "")
        fields, takes_state = {}, False
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name == STATE:
                takes_state = True
                continue
            if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                raise ToolDefinitionError(f"tool {name}: parameter {parameter} cannot be given by name")
            default = ... if parameter.default is parameter.empty else parameter.default
            described = (
                {"description": argument_docs[parameter.name]} if parameter.name in argument_docs else {}
            )
            fields[parameter.name] = (hints.get(parameter.name, Any), Field(default, **described))
        try:
            # Arguments the tool does not take are dropped, not refused: small models add keys
            # from the schema they were shown ("type": "string"), and the call is still clear.
            model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="ignore"), **fields)
            parameters = model.model_json_schema(schema_generator=_ToolJsonSchema)
        except Exception as e:  # noqa: BLE001 - a type pydantic cannot validate or describe
            raise ToolDefinitionError(f"tool {name}: no JSON schema for its arguments: {e}") from None
        spec = {"name": name, "description": description, "parameters": parameters}
        return cls(name, function, model, takes_state, {"type": "function", "function": spec})


def collect_tools(module: types.ModuleType) -> dict[str, Tool]:
    """`TOOLS` if the module lists them, else every public function defined in it but setup."""
    listed = getattr(module, "TOOLS", None)
    if listed is None:
        listed = [
            value
            for name, value in vars(module).items()
            if inspect.isfunction(value)
            and value.__module__ == module.__name__
            and not name.startswith("_")
            and name != "setup"
        ]
    not_functions = [repr(f) for f in listed if not callable(f) or not hasattr(f, "__name__")]
    if not_functions:
        raise ToolDefinitionError(f"TOOLS holds {', '.join(not_functions)}: not functions")
    tools = {tool.name: tool for tool in map(Tool.from_function, listed)}
    if not tools:
        raise ToolDefinitionError("it defines no tools (public functions, or TOOLS = [...])")
    return tools


def _arguments_problem(tool: str, error: ValidationError) -> str:
    problems = [f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in error.errors()[:10]]
    return f"invalid arguments for {tool}: {'; '.join(problems)}"


class ToolsSession:
    """One episode: the tools and setup(item)'s state."""

    def __init__(self, tools: dict[str, Tool], state, max_content_chars: int, call_reward: float = 0.0):
        self.tools, self.state, self.max_content_chars = tools, state, max_content_chars
        self.call_reward = call_reward  # still to pay: TOOL_CALL_REWARD until a turn's calls all ran

    def step(self, message: dict) -> dict:
        calls = parse_tool_calls(str(message.get("content") or ""))
        if not calls:
            return {"messages": [], "done": True, "reward": None}
        messages, errors, all_ran = [], [], True
        for call in calls:
            content, error = self._run(call)
            messages.append({"role": "tool", "name": call.name or "", "content": self._bounded(content)})
            all_ran = all_ran and not content.startswith("Error: ")
            if error:
                errors.append(error)
        reward, self.call_reward = (self.call_reward, 0.0) if all_ran else (None, self.call_reward)
        reply = {"messages": messages, "done": False, "reward": reward or None}
        return {**reply, "error": "\n".join(errors)} if errors else reply

    def _run(self, call: ToolCall) -> tuple[str, str | None]:
        """(the tool message's content, the environment's fault or None)."""
        if call.problem is not None:
            return f"Error: {call.problem}", None
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}; the tools are: {', '.join(self.tools)}", None
        try:
            arguments = tool.arguments.model_validate(call.arguments)
        except ValidationError as e:
            return f"Error: {_arguments_problem(tool.name, e)}", None
        values = {name: getattr(arguments, name) for name in type(arguments).model_fields}
        if tool.takes_state:
            values[STATE] = self.state
        try:
            result = tool.function(**values)
        except Exception as e:  # noqa: BLE001 - the tool's fault: told to the model, and reported
            summary = "".join(traceback.format_exception_only(e)).strip()
            trace = "".join(traceback.format_exception(e))[-2000:]
            return f"Error: tool {tool.name} raised {summary}", f"tool {tool.name} raised {summary}\n{trace}"
        return (result if isinstance(result, str) else json.dumps(result, default=str)), None

    def _bounded(self, content: str) -> str:
        if len(content) <= self.max_content_chars:
            return content
        return content[: self.max_content_chars] + f"\n... (cut at {self.max_content_chars} characters)"


class ToolsEnvironment:
    """start(item) for a module of tool functions; describe() = their JSON schemas."""

    def __init__(self, module: types.ModuleType, spec: dict):
        self.tools = collect_tools(module)
        self.setup = getattr(module, "setup", None)
        if self.setup is not None and not callable(self.setup):
            raise ToolDefinitionError("setup must be a function setup(item) -> state")
        self.max_content_chars = spec.get("max_content_chars", 16384)
        self.call_reward = getattr(module, "TOOL_CALL_REWARD", 0.0)
        if not isinstance(self.call_reward, (int, float)) or isinstance(self.call_reward, bool):
            raise ToolDefinitionError(f"TOOL_CALL_REWARD must be a number, not {self.call_reward!r}")

    def describe(self) -> list[dict]:
        return [tool.schema for tool in self.tools.values()]

    def __call__(self, item: dict):
        state = self.setup(item) if self.setup is not None else None
        session = ToolsSession(self.tools, state, self.max_content_chars, float(self.call_reward))
        return session, {"messages": None, "tools": self.describe()}
