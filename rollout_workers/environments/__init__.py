"""The environment library (docs/agentic.md): what multi-turn episodes talk to.

Two sides. Inside the sandbox (core/sandbox/, session mode) the runner imports `library.build`,
the factory named by the client, and builds the user's environment from its spec: `python`
(python_env.py: a user class with reset/step/tools) or `tools` (tools_env.py: plain functions
called through `<tool_call>` blocks, tool_calls.py). These modules import only the standard
library and pydantic. On the trusted side, client.py (EnvironmentClient) starts that sandbox,
checks every reply and turns faults into error observations or ended episodes.

Nothing is imported here: this package is imported on both sides.
"""
