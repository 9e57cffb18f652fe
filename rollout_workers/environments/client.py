"""The trusted side of an environment: EnvironmentClient, a rollout worker's handle on its
sandboxed environment (one SessionSandbox, core/sandbox/session.py, for all its episodes;
thread-safe), and check_environment, which refuses a bad spec at job start.

Every reply is untrusted: it is validated here (pydantic, strict) and secrets are redacted
(by the sandbox). Faults follow `rollout.environment_errors`: with `observe` the model gets an
error observation and the episode goes on, unless the fault ended the environment's process
(a hang past `environment_timeout_s`, a flood, a crash, a limit, the runner lost): then the
episode ends with the observation appended; with `end` every fault ends the episode. `error`
carries the reason either way. Nothing here raises for what the environment does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from core.config import ConfigError
from core.sandbox.session import SessionEpisode, SessionResult, SessionSandbox
from core.sandbox.target import SandboxLimits, SandboxTarget
from rollout_workers.config import EnvironmentSpec, RolloutConfig

ENVIRONMENT_FACTORY = "rollout_workers.environments.library:build"  # imported inside the sandbox
MAX_OPEN_EPISODES = 256  # one sandbox serves all of a worker's concurrent episodes
MAX_OUTPUT_BYTES = 256 * 1024  # of one reply, and of what one call prints
MAX_CONTENT_CHARS = 16384  # of one tool result (the worker cuts to max_tool_output_tokens)
MAX_ERROR_OBSERVATION_CHARS = 500


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # e.g. "name" of a tool message
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Observation(_Message):
    role: Literal["tool", "user"]


class _Start(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    messages: list[_Message] | None = None
    tools: list[dict[str, Any]] | None = None


class _Step(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    messages: list[_Observation] = []
    done: bool = False
    reward: Annotated[float, Field(allow_inf_nan=False)] | None = None
    error: str | None = None  # the environment's own fault (a tool raised); the episode may go on


_TOOLS = TypeAdapter(list[dict[str, Any]] | None, config=ConfigDict(strict=True))


@dataclass
class EpisodeStart:
    handle: SessionEpisode | None  # None when the reset failed
    messages: list[dict] | None = None  # the initial context; None: the item's own prompt
    tools: list[dict] | None = None  # this episode's tool specs (a python env's tools())
    error: str | None = None


@dataclass
class StepResult:
    messages: list[dict]  # observations to append (an error observation included)
    done: bool
    reward: float | None = None
    error: str | None = None  # the fault's reason, when there was one


def _problem(what: str, error: ValidationError) -> str:
    details = [f"{'.'.join(map(str, e['loc'])) or 'the value'}: {e['msg']}" for e in error.errors()[:5]]
    return f"{what} is not what docs/agentic.md asks for: {'; '.join(details)}"


def runner_spec(spec: EnvironmentSpec) -> dict:
    """The spec as the factory (library.build) gets it: the file's code inlined, because the
    runner, as nobody, may not be able to read it; its path names it in tracebacks."""
    try:
        code = Path(spec.path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"environment {spec.path} cannot be read: {e}") from None
    return {**spec.model_dump(mode="json"), "code": code, "max_content_chars": MAX_CONTENT_CHARS}


def environment_limits(rollout: RolloutConfig) -> SandboxLimits:
    return SandboxLimits(
        timeout_s=rollout.environment_timeout_s,
        cpu_s=rollout.environment_cpu_s,
        memory_mb=rollout.environment_memory_mb,
        max_output_bytes=MAX_OUTPUT_BYTES,
        max_episodes=MAX_OPEN_EPISODES,
        allow_weak_isolation=rollout.environment_allow_weak_isolation,
        weak_isolation_key="rollout.environment_allow_weak_isolation",
    )


class EnvironmentClient:
    """The sandboxed environment of `spec`, under the limits of the `rollout` section."""

    def __init__(self, spec: EnvironmentSpec, rollout: RolloutConfig, secrets: tuple[str, ...] = ()):
        """`secrets`: values to redact from replies besides those the sandbox finds itself."""
        target = SandboxTarget(
            factory=ENVIRONMENT_FACTORY,
            spec=runner_spec(spec),
            label=f"environment {spec.path}",
            role="environment",
            mounts=(spec.path,),  # tracebacks show its lines
            loopback=spec.type == "agent",  # the agent calls its endpoint over the sandbox's loopback
        )
        self._sandbox = SessionSandbox(target, environment_limits(rollout), secrets)
        self._errors = rollout.environment_errors
        self._error_role = "tool" if spec.type == "tools" else "user"
        self._tools, self._tools_problem = None, None
        try:
            self._tools = _TOOLS.validate_python(self._sandbox.description)
        except ValidationError as e:
            self._tools_problem = _problem(f"environment {spec.path}: its tools", e)

    def __enter__(self) -> EnvironmentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def load_error(self) -> str | None:
        """Why the environment cannot run (every reset then fails with it); None when it loads."""
        return self._sandbox.load_error or self._tools_problem

    @property
    def protections(self) -> list[str]:
        return self._sandbox.protections

    def describe(self) -> list[dict] | None:
        """The tools' JSON-schema specs shown to the model (None: it has none)."""
        return self._tools

    def reset(self, item: dict) -> EpisodeStart:
        """A new episode for `item` (in its own sandboxed process)."""
        if self.load_error is not None:
            return EpisodeStart(None, error=self.load_error)
        handle, result = self._sandbox.open(item)
        if handle is None:
            return EpisodeStart(None, error=f"environment reset failed: {result.error}")
        try:
            start = _Start.model_validate(result.value)
        except ValidationError as e:
            self._sandbox.close(handle)
            return EpisodeStart(None, error=_problem("what reset returned", e))
        messages = None if start.messages is None else [m.model_dump() for m in start.messages]
        return EpisodeStart(handle, messages, start.tools)

    def step(self, handle: SessionEpisode | None, assistant_text: str) -> StepResult:
        """The environment's answer to the model's message."""
        if handle is None:
            return StepResult([], done=True, error="the episode has no environment (its reset failed)")
        result: SessionResult = self._sandbox.call(
            handle, "step", {"role": "assistant", "content": assistant_text}
        )
        if result.error is not None:
            return self._fault(result.error, ended=result.ended)
        try:
            step = _Step.model_validate(result.value)
        except ValidationError as e:
            return self._fault(_problem("what step returned", e), ended=False)
        messages = [m.model_dump() for m in step.messages]
        if step.error is not None:
            if self._errors == "end":
                return StepResult([], done=True, reward=step.reward, error=step.error)
            return StepResult(messages, done=step.done, reward=step.reward, error=step.error)
        return StepResult(messages, done=step.done, reward=step.reward)

    def _fault(self, reason: str, ended: bool) -> StepResult:
        if self._errors == "end":
            return StepResult([], done=True, error=reason)
        summary = (reason.strip().splitlines() or ["unknown"])[0][:MAX_ERROR_OBSERVATION_CHARS]
        observation = {"role": self._error_role, "content": f"Error: {summary}"}
        return StepResult([observation], done=ended, error=reason)

    def close(self, handle: SessionEpisode | None = None) -> None:
        """End one episode (its processes killed); without one, the whole sandbox."""
        self._sandbox.close(handle)


def check_environment(
    spec: EnvironmentSpec, rollout: RolloutConfig, where: str = "rollout.environment"
) -> list[dict] | None:
    """Refuse, at job start, an environment that validates but cannot run: a missing or
    unreadable file, one that does not load in the sandbox (a syntax error, no such class, a
    tool without a JSON schema, ...). Raises ConfigError naming the field, the file and why.
    Returns its tools (their JSON-schema specs; None: it has none)."""
    if not Path(spec.path).is_file():
        raise ConfigError(f"{where}.path: {spec.path} not found")
    try:
        client = EnvironmentClient(spec, rollout)
    except ConfigError as e:
        raise ConfigError(f"{where}.path: {e}") from None
    with client:
        if client.load_error is not None:
            raise ConfigError(f"{where}: {client.load_error}")
        return client.describe()
