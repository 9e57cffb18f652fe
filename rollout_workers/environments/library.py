"""The factory the sandbox runner imports (inside the sandbox) to build an environment: `build`.

Its spec (made by client.py): {"type": "python"|"tools"|"agent", "path", "code" (the file's text, read by
the trusted side: the runner, as nobody, may not be able to read it), "class_name", "options",
"max_content_chars"}. What it returns is what session mode hosts (core/sandbox/episodes.py):
`start(item) -> (session, {"messages", "tools"})`, with `describe()` -> the tools' JSON schemas
(or None), and `session.step(message) -> {"messages", "done", "reward"[, "error"]}`.
"""

from __future__ import annotations

import sys
import types

from rollout_workers.environments.agent_env import AgentEnvironment
from rollout_workers.environments.python_env import PythonEnvironment
from rollout_workers.environments.tools_env import ToolsEnvironment

MODULE_NAME = "rft_environment"


def load_module(spec: dict) -> types.ModuleType:
    """The user's file as a module (registered in sys.modules, so that dataclasses, pickle and
    typing find it), its code compiled under its path so that tracebacks name it."""
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = spec["path"]
    sys.modules[MODULE_NAME] = module
    exec(compile(spec["code"], spec["path"], "exec"), module.__dict__)
    return module


def build(spec: dict):
    """start(item) for an environment spec; raises (a load error naming the file) if it cannot."""
    module = load_module(spec)
    kinds = {"python": PythonEnvironment, "tools": ToolsEnvironment, "agent": AgentEnvironment}
    if spec["type"] not in kinds:
        raise ValueError(f"unknown environment type {spec['type']!r}")
    return kinds[spec["type"]](module, spec)
