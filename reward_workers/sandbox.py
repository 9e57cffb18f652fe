"""Run untrusted grader code (and, through it, untrusted model output) outside this process: the
grader-specific layer over the sandbox of core/sandbox/.

One GraderSandbox keeps one warm runner (core/sandbox/runner.py, grade mode) in fresh network,
pid and mount namespaces made by `unshare` (and a user namespace unless the service is host
root): no network, an empty environment, no capabilities, rlimits. The runner builds the grader
once from its spec (any type of the grader library, reward_workers/graders/, through the factory
GRADER_FACTORY) and grades each sample in a forked child with its own CPU, wall-clock, process
and output limits. If the runner itself dies, the sample in flight scores 0 with the reason and
a new runner grades the rest.

Reads: the runner's minimal root (core/sandbox/root.py) holds the interpreter, /usr, the
virtualenv, core/ and reward_workers/ (the grader library), plus per grader type what
GRADER_MOUNTS names (a python grader's own file; /sys/devices/system/cpu for triton_kernel),
read-only; the runner is uid 65534 (core/sandbox/privileges.py). As a second line of defence,
secrets this process knows (core/sandbox/redaction.py) are redacted from every result.
Memory and CPU limits are per process, not for the sandbox as a whole (no cgroups).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.sandbox.redaction import known_secrets, redact, redact_all
from core.sandbox.runner_process import (
    RUNNER_GRACE_S,
    Isolation,
    RunnerFailure,
    RunnerProcess,
    TargetLoadError,
)
from core.sandbox.target import SandboxLimits, SandboxTarget
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import GraderConfig, PythonGrader
from reward_workers.graders.llm_judge import Judges

log = logging.getLogger(__name__)

GRADER_FACTORY = "reward_workers.graders:build_grader"  # imported by the runner, inside the sandbox
MAX_ERROR_CHARS = 4000
RESULT_KEYS = {"reward", "components", "hack_flags", "diagnostics"}
MAX_DIAGNOSTICS = 20
# What a grader type needs in the sandbox's root beyond core/sandbox/root.MOUNTS and the grader
# library; code_tests, sql, text_similarity, llm_judge, numeric, regex, json_match and
# string_check need nothing more (code_tests starts the same interpreter; sqlite3 is in the
# stdlib and /usr; llm_judge's model runs outside, only its scoring runs here).
GRADER_MOUNTS = {
    "python": lambda spec: [spec["path"]] if os.path.isfile(spec.get("path", "")) else [],  # tracebacks
    "triton_kernel": lambda spec: ["/sys/devices/system/cpu"],  # torch's CPU detection (cpuinfo)
    "multi": lambda spec: [path for sub in spec["graders"].values() for path in grader_mounts(sub)],
}


@dataclass
class GradeResult:
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the sample scored 0 (the grader failed); None on success
    hack_flags: list[str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)  # e.g. failing tests and their traces

    @classmethod
    def failed(cls, reason: str) -> GradeResult:
        return cls(reward=0.0, error=reason[:MAX_ERROR_CHARS])


class _UnreadableSource(Exception):
    """A python grader's file cannot be read."""


def runner_spec(grader: GraderConfig) -> dict:
    """The grader spec as the runner gets it: JSON, with every python grader's code inlined
    (the runner, as nobody, may not be able to read the file) and `path` naming it in errors."""
    spec = grader.model_dump(mode="json")
    if isinstance(grader, PythonGrader):
        if grader.is_inline:
            return {**spec, "path": f"<{grader.name}>", "code": grader.source}
        try:
            return {**spec, "path": grader.source, "code": Path(grader.source).read_text()}
        except (OSError, UnicodeDecodeError) as e:
            raise _UnreadableSource(f"grader {grader.source} cannot be read: {e}") from None
    if spec["type"] == "multi":
        spec["graders"] = {name: runner_spec(sub) for name, sub in grader.graders.items()}
    return spec


def grader_mounts(spec: dict) -> list[str]:
    """The read-only paths a grader of this (runner) spec needs beyond the sandbox's own."""
    extra = GRADER_MOUNTS.get(spec["type"])
    return extra(spec) if extra else []


def grader_limits(limits: RewardConfig) -> SandboxLimits:
    return SandboxLimits(
        timeout_s=limits.timeout_s,
        cpu_s=limits.cpu_s,
        memory_mb=limits.memory_mb,
        max_output_bytes=limits.max_output_bytes,
        allow_weak_isolation=limits.allow_weak_isolation,
        weak_isolation_key="reward.allow_weak_isolation",
    )


def _finite(value, what: str) -> float:
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    if not math.isfinite(number):
        raise ValueError(
            f"grader returned {type(value).__name__} {value!r:.80} as {what}, expected a finite number"
        )
    return number


def _validated(value) -> GradeResult:
    """Turn what grade() returned (decoded from JSON) into a GradeResult, or raise ValueError."""
    if not isinstance(value, dict):
        try:
            return GradeResult(_finite(value, "the reward"))
        except ValueError as e:
            raise ValueError(f"{e} (grade() must return one, or a dict with a 'reward' key)") from None
    if "reward" not in value or not RESULT_KEYS.issuperset(value):
        raise ValueError(
            f"grader returned a dict with keys {sorted(value)}; "
            f"expected 'reward' and optionally 'components', 'hack_flags', 'diagnostics'"
        )
    components = value.get("components", {})
    if not isinstance(components, dict):
        raise ValueError(f"grader's components is {type(components).__name__}, expected a dict")
    flags, diagnostics = value.get("hack_flags", []), value.get("diagnostics", [])
    for key, strings in (("hack_flags", flags), ("diagnostics", diagnostics)):
        if not isinstance(strings, list) or not all(isinstance(f, str) for f in strings):
            raise ValueError(f"grader's {key} must be a list of strings")
    return GradeResult(
        reward=_finite(value["reward"], "the reward"),
        components={k: _finite(v, f"component {k!r}") for k, v in components.items()},
        hack_flags=flags,
        diagnostics=[d[:MAX_ERROR_CHARS] for d in diagnostics[:MAX_DIAGNOSTICS]],
    )


def _result_from_reply(reply: dict) -> GradeResult:
    if "error" in reply:
        return GradeResult.failed(str(reply["error"]))
    try:
        return _validated(reply.get("value"))
    except ValueError as e:
        return GradeResult.failed(str(e))


class GraderSandbox:
    """One warm sandboxed runner for one grader. Not thread-safe; use as a context manager."""

    def __init__(self, grader: GraderConfig, limits: RewardConfig, secrets: tuple[str, ...] = ()):
        """`secrets`: values to redact from results besides those known_secrets() finds."""
        self._grader = grader
        self._limits = grader_limits(limits)
        self._extra_secrets = tuple(secrets)
        self.secrets_redacted = 0  # secrets cut out of results so far (redaction.py)
        self._isolation = Isolation.decide(self._limits, role="grader")
        self._runner: RunnerProcess | None = None
        self._load_error: str | None = None
        self.protections: list[str] = []  # what the running sandbox enforces, as reported by it
        # llm_judge models are called here, in this trusted process, not in the sandbox (no network)
        self._judges = Judges.for_grader(grader)
        try:
            self._start_runner()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GraderSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def grade(self, samples: list[dict], items: list[dict]) -> list[GradeResult]:
        """Grade sample i against item i; every sample gets a result, in order."""
        if len(samples) != len(items):
            raise ValueError(f"{len(samples)} samples but {len(items)} items")
        if self._judges is not None:
            samples = self._judges.attach(samples, items)
        secrets = known_secrets(self._extra_secrets)  # per batch: a token may appear meanwhile
        return [self._redacted(self._grade_one(s, i), secrets) for s, i in zip(samples, items)]

    def _redacted(self, result: GradeResult, secrets: list[str]) -> GradeResult:
        """Every string of the result with the known secrets cut out; counts them."""
        if not secrets:
            return result
        result.hack_flags, flags = redact_all(result.hack_flags, secrets)
        result.diagnostics, diagnostics = redact_all(result.diagnostics, secrets)
        errors = 0
        if result.error is not None:
            result.error, errors = redact(result.error, secrets)
        count = flags + diagnostics + errors
        if count:
            self.secrets_redacted += count
            log.warning("redacted %d secret(s) from a grader's result", count)
        return result

    def close(self) -> None:
        if self._runner is not None:
            self._stop_runner()
        self._isolation.clean_up()

    # -- one sample ---------------------------------------------------------------------------

    def _grade_one(self, sample: dict, item: dict) -> GradeResult:
        for _attempt in range(2):
            if self._runner is None and self._load_error is None:
                self._start_runner()
            if self._load_error is not None:
                return GradeResult.failed(self._load_error)
            try:
                self._runner.send({"args": [sample, item]})
                break
            except OSError:  # it died after its last reply (not this sample's doing): start afresh
                self._stop_runner()
        else:
            return GradeResult.failed("the sandbox runner keeps dying before taking a sample")
        try:
            reply = self._runner.read_reply(self._limits.timeout_s + RUNNER_GRACE_S)
        except RunnerFailure as e:
            self._stop_runner()
            return GradeResult.failed(f"sandbox runner {e} while grading this sample")
        return _result_from_reply(reply)

    # -- the runner process -------------------------------------------------------------------

    def _start_runner(self) -> None:
        try:
            spec = runner_spec(self._grader)
        except _UnreadableSource as e:
            self._load_error = str(e)
            return
        target = SandboxTarget(
            factory=GRADER_FACTORY,
            spec=spec,
            label=f"grader {spec.get('path', spec['name'])}",
            role="grader",
            mounts=tuple(grader_mounts(spec)),
        )
        runner = RunnerProcess(target, self._limits, "grade", self._isolation, self._extra_secrets)
        try:
            self.protections = list(runner.start().get("protections", []))
        except TargetLoadError as e:
            self._load_error = str(e)
            return
        self._runner = runner

    def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        runner.stop()
