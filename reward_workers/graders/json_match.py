"""json_match: a JSON answer or tool call(s) against the expected one, with partial credit.

The expected value (the `reference` template, a JSON value or JSON text) is one of:
- a tool call {"name": ..., "arguments": {...}} (also OpenAI's {"function": {...}} form, with
  arguments as a JSON string), or a list of them: credit = name_weight for the right function +
  the rest shared equally among the expected arguments; calls are paired in order and a missing
  or extra call counts as a wrong one;
- {"clarifying_question": true} or {"refusal": true}: the right answer is not to call a tool
  (full credit for a reply with no call; a clarifying question must also ask something, '?');
- any other JSON: credit per field, recursively (objects: mean over the expected keys; lists:
  per position over the longer list; scalars: equal, numbers within 1e-9).
The model's reply may be bare JSON, fenced ```json, or <tool_call>...</tool_call> blocks.
"""

from __future__ import annotations

import json
import math
import re

from reward_workers.graders.templates import GraderInputError, render, render_text

_TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCED_JSON = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)
NO_CALL_KINDS = ("clarifying_question", "refusal")


def parse_json_reply(text: str):
    """Every JSON value the reply offers, most explicit form first; [] if none."""
    tagged = _TOOL_CALL_TAG.findall(text)
    candidates = tagged or _FENCED_JSON.findall(text) or [text]
    values = []
    for candidate in candidates:
        try:
            values.append(json.loads(candidate))
            continue
        except ValueError:
            pass
        decoder = json.JSONDecoder()  # JSON embedded in prose: the first object that parses
        for start in (i for i, c in enumerate(candidate) if c in "{["):
            try:
                values.append(decoder.raw_decode(candidate, start)[0])
                break
            except ValueError:
                continue
    return values


def _as_call(value) -> dict | None:
    """{"name", "arguments": dict} from the usual tool-call shapes, else None."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and ("arguments" in value or "parameters" in value)
    ):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return {"name": value["name"], "arguments": None}
    return {"name": value["name"], "arguments": arguments}


def _calls(values: list) -> list[dict]:
    calls = []
    for value in values:
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        for one in value if isinstance(value, list) else [value]:
            call = _as_call(one)
            if call is not None:
                calls.append(call)
    return calls


def similarity(expected, actual) -> float:
    """Share of `expected` that `actual` reproduces, in [0, 1]."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return 0.0
        if not expected:
            return float(not actual)
        return sum(similarity(v, actual[k]) if k in actual else 0.0 for k, v in expected.items()) / len(
            expected
        )
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return 0.0
        longest = max(len(expected), len(actual))
        return 1.0 if longest == 0 else sum(similarity(e, a) for e, a in zip(expected, actual)) / longest
    if isinstance(expected, bool) or isinstance(actual, bool):
        return float(expected is actual)
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return float(math.isclose(expected, actual, rel_tol=1e-9, abs_tol=1e-9))
    return float(expected == actual)


def _call_score(expected: dict, actual: dict | None, name_weight: float) -> float:
    if actual is None or actual["name"] != expected["name"]:
        return 0.0
    expected_args = expected["arguments"] or {}
    argument_credit = (
        similarity(expected_args, actual["arguments"]) if expected_args else float(not actual["arguments"])
    )
    return name_weight + (1.0 - name_weight) * argument_credit


def build(spec: dict):
    name_weight = spec["name_weight"]

    def grade(sample: dict, item: dict) -> dict:
        expected = render(spec["reference"], sample, item)
        if isinstance(expected, str):
            try:
                expected = json.loads(expected)
            except ValueError as e:
                raise GraderInputError(f"json_match reference is not JSON: {e}") from None
        text = render_text(spec["input"], sample, item)
        replies = parse_json_reply(text)
        calls = _calls(replies)
        kind = next(
            (k for k in NO_CALL_KINDS if isinstance(expected, dict) and expected.get(k) is True), None
        )
        if kind is not None:
            asked = "?" in text or kind == "refusal"
            return {"reward": float(not calls and asked), "components": {"no_call": float(not calls)}}
        expected_calls = _calls([expected])
        if expected_calls:
            longest = max(len(expected_calls), len(calls))
            scores = [
                _call_score(e, calls[i] if i < len(calls) else None, name_weight)
                for i, e in enumerate(expected_calls)
            ]
            names = sum(
                i < len(calls) and calls[i]["name"] == e["name"] for i, e in enumerate(expected_calls)
            )
            return {
                "reward": sum(scores) / longest,
                "components": {"valid_json": float(bool(replies)), "name": names / longest},
            }
        if not replies:
            return {"reward": 0.0, "components": {"valid_json": 0.0}, "diagnostics": ["no JSON in the reply"]}
        return {"reward": similarity(expected, replies[0]), "components": {"valid_json": 1.0}}

    return grade
