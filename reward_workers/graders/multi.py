"""multi: named sub-graders combined by a `calculate_output` formula over their rewards, or by
a weighted mean (`weights`; equal weights when neither is given).

Components: each sub-grader's reward under its name, and its own components as name.component.
Hack flags are prefixed with the sub-grader's name; any hack flag zeroes the combined reward
(credit for the rest of an answer must not pay for a hack). A sub-grader error fails the sample.
"""

from __future__ import annotations

import math

from reward_workers.graders import formula


def sub_result(value, name: str) -> dict:
    """A sub-grader's result as a dict with a finite reward (python graders may return a float)."""
    result = value if isinstance(value, dict) else {"reward": value}
    reward = result.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"sub-grader {name!r} returned {value!r:.80}, expected a finite reward")
    return result


def build(spec: dict, build_grader):
    graders = {name: build_grader(sub_spec) for name, sub_spec in spec["graders"].items()}
    tree = formula.parse(spec["calculate_output"], set(graders)) if spec.get("calculate_output") else None
    weights = spec.get("weights") or {name: 1.0 for name in graders}
    total_weight = sum(weights.values())

    def grade(sample: dict, item: dict) -> dict:
        scores, components, flags, diagnostics = {}, {}, [], []
        for name, grader in graders.items():
            result = sub_result(grader(sample, item), name)
            scores[name] = float(result["reward"])
            components[name] = scores[name]
            components.update({f"{name}.{k}": v for k, v in result.get("components", {}).items()})
            flags += [f"{name}:{flag}" for flag in result.get("hack_flags", [])]
            diagnostics += [f"{name}: {line}" for line in result.get("diagnostics", [])]
        if tree is not None:
            reward = formula.evaluate(tree, scores)
        else:
            reward = sum(weights[name] * score for name, score in scores.items()) / total_weight
        return {
            "reward": 0.0 if flags else reward,
            "components": components,
            "hack_flags": flags,
            "diagnostics": diagnostics,
        }

    return grade
