"""python: user code defining grade(sample, item) -> float | dict, from a file or inline (the
OpenAI RFT `source` string). What grade() returns is validated by the sandbox's parent."""

from __future__ import annotations


def build(spec: dict):
    path = spec["path"]
    module = {"__name__": "grader", "__file__": path}
    exec(compile(spec["code"], path, "exec"), module)
    grade = module.get("grade")
    if not callable(grade):
        raise ValueError(f"{path} does not define a function grade(sample, item)")
    return grade
