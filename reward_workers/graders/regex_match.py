"""regex: the output must match a pattern (search or fullmatch), or a group extracted by it
(the group named `answer`, else group 1, else the whole match) must equal a reference."""

from __future__ import annotations

import re

from reward_workers.graders.templates import render_text


def build(spec: dict):
    pattern = re.compile(spec["pattern"], re.IGNORECASE if spec["ignore_case"] else 0)
    mode = spec["mode"]

    def grade(sample: dict, item: dict) -> dict:
        text = render_text(spec["input"], sample, item)
        if mode == "fullmatch":
            return {"reward": float(pattern.fullmatch(text.strip()) is not None)}
        matches = list(pattern.finditer(text))
        if mode == "search":
            return {"reward": float(bool(matches))}
        if not matches:
            return {"reward": 0.0, "components": {"found": 0.0}, "diagnostics": ["pattern not found"]}
        match = matches[-1]  # the final answer, when the model restates it
        extracted = (
            match.group("answer")
            if "answer" in pattern.groupindex
            else match.group(1 if pattern.groups else 0)
        )
        reference = render_text(spec["reference"], sample, item)
        same = (
            (extracted or "").strip().casefold() == reference.strip().casefold()
            if spec["ignore_case"]
            else (extracted or "").strip() == reference.strip()
        )
        return {"reward": float(same), "components": {"found": 1.0}}

    return grade
