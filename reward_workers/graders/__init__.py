"""The grader library: each grader type builds, from its spec (a dict: the validated config,
see reward_workers/grader_spec.py), a function grade(sample, item) -> float | dict with
"reward" and optionally "components", "hack_flags", "diagnostics".

It runs inside the sandbox runner (core/sandbox/runner.py), which imports this package (the
factory build_grader, named by reward_workers/sandbox.py) inside the sandbox and builds the
grader once; every sample is graded in a forked child.
Standard library only at import time: third-party libraries load when a grader is built.
"""

from __future__ import annotations

from reward_workers.graders import (
    code_tests,
    json_match,
    llm_judge,
    multi,
    numeric,
    python_grader,
    regex_match,
    sql,
    string_check,
    text_similarity,
    triton_kernel,
)

BUILDERS = {
    "string_check": string_check.build,
    "regex": regex_match.build,
    "numeric": numeric.build,
    "json_match": json_match.build,
    "text_similarity": text_similarity.build,
    "python": python_grader.build,
    "code_tests": code_tests.build,
    "sql": sql.build,
    "triton_kernel": triton_kernel.build,
    "llm_judge": llm_judge.build,  # the model call happens before the sandbox: graders/llm_judge.py
    "score_model": llm_judge.build,
}


def build_grader(spec: dict):
    """grade(sample, item) for a grader spec; raises if the spec cannot be built."""
    kind = spec["type"]
    if kind == "multi":
        return multi.build(spec, build_grader)
    if kind not in BUILDERS:
        raise ValueError(f"unknown grader type {kind!r}")
    return BUILDERS[kind](spec)
