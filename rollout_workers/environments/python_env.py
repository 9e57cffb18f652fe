"""`python` environments: a user file with a class (default `Environment`, docs/agentic.md):
`__init__(**options)`, `reset(item) -> messages | None`, `step(message) -> {"messages", "done",
"reward"}` and optionally `tools() -> [JSON-schema tool specs]`. One instance per episode,
alive in the episode's sandboxed child between calls. What it returns is checked by the trusted
side (client.py), not here.
"""

from __future__ import annotations

import types


class PythonSession:
    """One episode: the user's environment object."""

    def __init__(self, environment):
        self.environment = environment

    def step(self, message: dict):
        return self.environment.step(message)


class PythonEnvironment:
    """start(item) for a user class; describe() = the tools of a fresh instance."""

    def __init__(self, module: types.ModuleType, spec: dict):
        name = spec.get("class_name") or "Environment"
        environment_class = getattr(module, name, None)
        if not isinstance(environment_class, type):
            raise ValueError(f"it defines no class {name}")
        missing = [
            method for method in ("reset", "step") if not callable(getattr(environment_class, method, None))
        ]
        if missing:
            raise ValueError(f"class {name} has no method {' or '.join(missing)}")
        self._class, self._options = environment_class, spec.get("options") or {}

    def describe(self):
        if not callable(getattr(self._class, "tools", None)):
            return None
        return self._class(**self._options).tools()

    def __call__(self, item: dict):
        environment = self._class(**self._options)
        messages = environment.reset(item)
        tools = environment.tools() if callable(getattr(environment, "tools", None)) else None
        return PythonSession(environment), {"messages": messages, "tools": tools}
