"""string_check: compare two rendered strings (OpenAI RFT semantics: like = contains)."""

from __future__ import annotations

from reward_workers.graders.templates import render_text

OPERATIONS = {
    "eq": lambda text, reference: text == reference,
    "ne": lambda text, reference: text != reference,
    "like": lambda text, reference: reference in text,
    "ilike": lambda text, reference: reference.lower() in text.lower(),
}


def build(spec: dict):
    check = OPERATIONS[spec["operation"]]

    def grade(sample: dict, item: dict) -> dict:
        passed = check(render_text(spec["input"], sample, item), render_text(spec["reference"], sample, item))
        return {"reward": float(passed)}

    return grade
