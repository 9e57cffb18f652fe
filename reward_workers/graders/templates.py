"""Template inputs shared by the built-in graders: `{{sample.output_text}}`, `{{item.a.b}}`,
`{{sample.output_json.field}}` (the OpenAI RFT grader convention), and answer extraction."""

from __future__ import annotations

import json
import re

from core.sandbox.target import TargetInputError

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)


class GraderInputError(TargetInputError):
    """The item or sample lacks what the grader spec asks for: a grader error, not a 0 score
    (reported by the sandbox as "grader input: ...")."""


def _lookup(path: str, sample: dict, item: dict):
    root, *keys = path.split(".")
    if root not in ("sample", "item"):
        raise GraderInputError(f"template {{{{{path}}}}}: must start with 'sample.' or 'item.'")
    value = sample if root == "sample" else item
    walked = root
    for key in keys:
        if root == "sample" and walked == "sample" and key == "output_json":
            try:
                value = json.loads(sample["output_text"])
            except ValueError as e:
                raise GraderInputError(f"template {{{{{path}}}}}: the output is not JSON ({e})") from None
        elif isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        else:
            raise GraderInputError(f"template {{{{{path}}}}}: {walked} has no field {key!r}")
        walked += f".{key}"
    return value


def render(template: str, sample: dict, item: dict):
    """A template that is exactly one placeholder gives the value itself (a list, dict, number);
    otherwise placeholders are substituted as text (non-strings as JSON)."""
    whole = _PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return _lookup(whole.group(1), sample, item)

    def substitute(match: re.Match) -> str:
        value = _lookup(match.group(1), sample, item)
        return value if isinstance(value, str) else json.dumps(value)

    return _PLACEHOLDER.sub(substitute, template)


def render_text(template: str, sample: dict, item: dict) -> str:
    value = render(template, sample, item)
    return value if isinstance(value, str) else json.dumps(value)


def last_code_block(text: str, languages: tuple[str, ...]) -> str:
    """The last fenced block in one of `languages` (or unlabelled); the whole text if none."""
    blocks = [body for language, body in _FENCE.findall(text) if language.lower() in languages + ("",)]
    return blocks[-1] if blocks else text
