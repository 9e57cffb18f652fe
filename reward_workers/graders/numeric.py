"""numeric: extract a number from the output and compare it with the reference within
abs_tol / rel_tol. Thousands separators, currency signs, percent signs and units are ignored."""

from __future__ import annotations

import math
import re

from reward_workers.graders.templates import GraderInputError, render_text

# 1,234.5  -12  3.  .5  1e-3  (a comma counts as a thousands separator only between digit triples)
NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
FRACTION = re.compile(r"([-+−]?\d+)\s*/\s*(\d+)")


def _numbers(text: str) -> list[float]:
    found = []
    for match in NUMBER.finditer(text):
        token = match.group(0)
        if not any(c.isdigit() for c in token.split("e")[0].split("E")[0]):
            continue
        try:
            found.append(float(token.replace(",", "").replace("−", "-")))
        except ValueError:
            continue
    return found


def parse_number(text: str) -> float | None:
    """The one number in `text`, e.g. '$1,200', '12 km', '45%', '3/4'; None if not exactly one."""
    fraction = FRACTION.fullmatch(text.strip())
    if fraction and int(fraction.group(2)):
        return int(fraction.group(1).replace("−", "-")) / int(fraction.group(2))
    numbers = _numbers(text)
    return numbers[0] if len(numbers) == 1 else None


def build(spec: dict):
    extract = spec["extract"]
    pattern = re.compile(spec["pattern"]) if spec.get("pattern") else None

    def answer(text: str) -> float | None:
        if extract == "whole":
            return parse_number(text)
        if extract == "pattern":
            matches = list(pattern.finditer(text))
            return parse_number(matches[-1].group(1 if pattern.groups else 0)) if matches else None
        numbers = _numbers(text)
        return (numbers[-1] if extract == "last_number" else numbers[0]) if numbers else None

    def grade(sample: dict, item: dict) -> dict:
        reference_text = render_text(spec["reference"], sample, item)
        reference = parse_number(reference_text)
        if reference is None:
            raise GraderInputError(f"numeric reference {reference_text!r:.80} is not a number")
        value = answer(render_text(spec["input"], sample, item))
        if value is None:
            return {"reward": 0.0, "components": {"found": 0.0}, "diagnostics": ["no number found"]}
        close = math.isclose(value, reference, rel_tol=spec["rel_tol"], abs_tol=spec["abs_tol"])
        return {"reward": float(close), "components": {"found": 1.0}}

    return grade
