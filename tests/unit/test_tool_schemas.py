"""The tools environment's pure parts: JSON schemas of typed functions (pydantic), docstrings,
and the parsing of `<tool_call>` blocks out of assistant messages. The sandboxed runs are in
test_environments.py."""

from __future__ import annotations

import socket
from typing import Annotated, Literal, Optional

import pytest
from pydantic import Field

from rollout_workers.environments.tool_calls import ToolCall, parse_tool_calls
from rollout_workers.environments.tools_env import Tool, ToolDefinitionError, ToolsSession, split_docstring


def search(
    query: str,
    limit: int = 5,
    threshold: float = 0.5,
    exact: bool = False,
    tags: list[str] = [],  # noqa: B006 - a tool's default, never mutated
    language: Optional[str] = None,
    state=None,
) -> str:
    """Search the catalogue for matching products.

    Longer explanation that is part of the description.

    Args:
        query: what to look for, e.g. "red shoes"
        limit (int): how many results
            at most (a continued line)
        tags: only products with all of these

    Returns:
        the matches, one per line
    """
    return f"{query}:{limit}:{threshold}:{exact}:{tags}:{language}:{state}"


def test_schema_of_a_typed_function():
    tool = Tool.from_function(search)
    assert tool.takes_state and tool.name == "search"
    spec = tool.schema["function"]
    assert tool.schema["type"] == "function" and spec["name"] == "search"
    assert spec["description"] == (
        "Search the catalogue for matching products. Longer explanation that is part of the description."
    )
    assert spec["parameters"] == {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {"type": "string", "description": 'what to look for, e.g. "red shoes"'},
            "limit": {
                "type": "integer",
                "default": 5,
                "description": "how many results at most (a continued line)",
            },
            "threshold": {"type": "number", "default": 0.5},
            "exact": {"type": "boolean", "default": False},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "default": [],
                "description": "only products with all of these",
            },
            "language": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
    }


def test_annotated_and_literal_arguments():
    def pick(colour: Literal["red", "blue"], count: Annotated[int, Field(ge=1, description="how many")]):
        """Pick."""

    properties = Tool.from_function(pick).schema["function"]["parameters"]["properties"]
    assert properties["colour"] == {"enum": ["red", "blue"], "type": "string"}
    assert properties["count"] == {"type": "integer", "minimum": 1, "description": "how many"}


def test_functions_that_cannot_be_tools_say_why():
    def star(*names: str):
        """Takes *names."""

    def unresolved(x: "NoSuchType"):  # noqa: F821 - the point of the test
        """A hint naming nothing."""

    def not_describable(sock: socket.socket):
        """An argument JSON cannot carry."""

    for function, reason in [
        (star, "cannot be given by name"),
        (unresolved, "cannot be resolved"),
        (not_describable, "no JSON schema"),
    ]:
        with pytest.raises(ToolDefinitionError, match=reason):
            Tool.from_function(function)


def test_docstring_without_sections_and_without_docstring():
    assert split_docstring("Just a line.\n\nAnd more.") == ("Just a line. And more.", {})
    assert split_docstring("") == ("", {})
    _, arguments = split_docstring("Do.\n\nArgs:\n    a: first\n    b (str): second\nRaises:\n    c: no")
    assert arguments == {"a": "first", "b": "second"}


def run_step(text: str, state=None) -> dict:
    session = ToolsSession({"search": Tool.from_function(search)}, state, max_content_chars=200)
    return session.step({"role": "assistant", "content": text})


def test_arguments_are_validated_and_coerced_before_the_call():
    reply = run_step(
        '<tool_call>{"name": "search", "arguments": {"query": "shoe", "limit": "3"}}</tool_call>'
    )
    assert reply["messages"] == [
        {"role": "tool", "name": "search", "content": "shoe:3:0.5:False:[]:None:None"}
    ]
    bad = run_step('<tool_call>{"name": "search", "arguments": {"limit": "many", "colour": 1}}</tool_call>')
    content = bad["messages"][0]["content"]
    assert content.startswith("Error: invalid arguments for search:")
    assert "query: Field required" in content and "limit: Input should be a valid integer" in content
    assert "colour" not in content  # an argument the tool does not take is dropped, not an error
    assert "error" not in bad and bad["done"] is False  # the model's mistake, not the environment's
    extra = run_step(
        '<tool_call>{"name": "search", "arguments": {"query": "hat", "type": "string"}} and then</tool_call>'
    )
    assert extra["messages"][0]["content"] == "hat:5:0.5:False:[]:None:None"  # text after the JSON ignored


def test_state_reaches_the_tool_and_long_results_are_cut():
    reply = run_step(
        '<tool_call>{"name": "search", "arguments": {"query": "' + "q" * 250 + '"}}</tool_call>', 7
    )
    assert reply["messages"][0]["content"] == "q" * 200 + "\n... (cut at 200 characters)"
    reply = run_step('<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>', state="S")
    assert reply["messages"][0]["content"].endswith(":S")


def test_a_reply_without_a_call_is_the_final_answer():
    assert run_step("The answer is 4.") == {"messages": [], "done": True, "reward": None}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>', [ToolCall("a", {"x": 1})]),
        (  # several, in order, with text around them
            'think <tool_call>\n{"name": "a"}\n</tool_call> then '
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
            [ToolCall("a", {}), ToolCall("b", {})],
        ),
        ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>', [ToolCall("a", {"x": 2})]),
        ('<tool_call>{"name": "a", "arguments": {"x": 1}}', [ToolCall("a", {"x": 1})]),  # closing tag cut off
        ("no call here", []),
        ("", []),
    ],
)
def test_tool_calls_parsed(text, expected):
    assert parse_tool_calls(text) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<tool_call>{name: a}</tool_call>", "not valid JSON"),
        ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'has no "name"'),
        ('<tool_call>{"name": 3}</tool_call>', 'has no "name"'),
        (
            '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
            '"arguments" must be a JSON object, not list',
        ),
        (
            '<tool_call>{"name": "a", "arguments": "{oops"}</tool_call>',
            '"arguments" string is not valid JSON',
        ),
        ('<tool_call>{"name": "a", "argu', "a <tool_call> without its </tool_call>"),
    ],
)
def test_malformed_tool_calls_name_the_problem(text, problem):
    [call] = parse_tool_calls(text)
    assert call.problem is not None and problem in call.problem


def test_every_call_of_a_reply_gets_its_message_in_order():
    text = (
        '<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        "<tool_call>{bad}</tool_call>"
        '<tool_call>{"name": "search", "arguments": {"query": "b"}}</tool_call>'
    )
    contents = [m["content"] for m in run_step(text)["messages"]]
    assert contents[0].startswith("a:5") and contents[3].startswith("b:5")
    assert contents[1] == "Error: unknown tool 'nope'; the tools are: search"
    assert contents[2].startswith("Error: the tool call is not valid JSON")
