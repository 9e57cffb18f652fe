"""Run untrusted grader code (and, through it, untrusted model output) outside this process.

One GraderSandbox keeps one warm runner (sandbox_runner.py) in fresh network, pid and mount
namespaces made by `unshare` (and a user namespace unless the service is host root): no
network, an empty environment, no capabilities, rlimits. The runner builds the grader once from
its spec (any type of the grader library, reward_workers/graders/) and grades each sample in a
forked child with its own CPU, wall-clock, process and output limits. If the runner itself
dies, the sample in flight scores 0 with the reason and a new runner grades the rest.

Reads: before loading the grader the runner pivots into a minimal root (sandbox_root.py: the
interpreter, /usr, the virtualenv, the grader library and the grader's own files, read-only;
a private /tmp, a minimal /dev and /etc, its own /proc) and becomes uid 65534 in a user namespace
of its own (sandbox_privileges.py) -- host nobody when the service runs as root. Home
directories, host /etc, run directories, caches and ~/.ray are not in its view at all. As a
second line of defence, secrets this process knows (redaction.py: the Ray token, *_TOKEN, *_KEY,
*_SECRET, *_PASSWORD and RFT_* variables, the Redis password) are redacted from every result.
Memory and CPU limits are per process, not for the sandbox as a whole (no cgroups).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from reward_workers.config import RewardConfig
from reward_workers.grader_spec import GraderConfig, PythonGrader
from reward_workers.graders.llm_judge import Judges
from reward_workers.redaction import known_secrets, redact, redact_all

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("sandbox_runner.py")
# As host root: no user namespace, so that the runner can become host nobody (sandbox_privileges).
ROOT_NAMESPACE_FLAGS = ("--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL")
NAMESPACE_FLAGS = ("--user", "--map-root-user", *ROOT_NAMESPACE_FLAGS)
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# RLIMIT_NPROC of each grading child (uid 65534 in the sandbox's own user namespace, so counted
# per sandbox); the runner also caps its pid namespace (Linux >= 6.14).
MAX_PROCESSES = 64
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
LOAD_TIMEOUT_S = 60.0  # runner start + grader import
RUNNER_GRACE_S = 5.0  # beyond timeout_s: fork, kill and clean-up of one sample
MAX_ERROR_CHARS = 4000
RESULT_KEYS = {"reward", "components", "hack_flags", "diagnostics"}
MAX_DIAGNOSTICS = 20


class SandboxUnavailableError(RuntimeError):
    """Graders cannot be isolated here and the config does not accept weaker isolation."""


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


class _RunnerFailure(Exception):
    """The runner died, hung or broke the protocol."""


class _UnreadableSource(Exception):
    """A python grader's file cannot be read."""


def runner_spec(grader: GraderConfig) -> dict:
    """The grader spec as the runner gets it: JSON, with every python grader's code inlined
    (the runner's filesystem view may not include the file) and `path` naming it in errors."""
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


def _probe(unshare: str, flags: tuple[str, ...]) -> str | None:
    try:
        probe = subprocess.run(
            [unshare, *flags, "true"], capture_output=True, text=True, env=SANDBOX_ENV, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare` failed to run: {e}"
    if probe.returncode != 0:
        return f"`unshare {' '.join(flags)}` failed: {probe.stderr.strip()}"
    return None


@functools.cache
def namespace_flags() -> tuple[str, ...]:
    """The `unshare` flags of the runner: without a user namespace when this process is host root
    and may make namespaces (the runner then becomes host nobody), else with one."""
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare and _probe(unshare, ROOT_NAMESPACE_FLAGS) is None:
        return ROOT_NAMESPACE_FLAGS
    return NAMESPACE_FLAGS


@functools.cache
def namespace_problem() -> str | None:
    """None if `unshare` can make the sandbox's namespaces here, else why not (probed once)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the `unshare` program (util-linux) is not installed"
    return _probe(unshare, namespace_flags())


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
        self._limits = limits
        self._extra_secrets = tuple(secrets)
        self.secrets_redacted = 0  # secrets cut out of results so far (redaction.py)
        problem = namespace_problem()
        if problem and not limits.allow_weak_isolation:
            raise SandboxUnavailableError(
                f"cannot isolate graders: {problem}. Graders would run with network access and "
                "the host's filesystem; set reward.allow_weak_isolation=true to accept that."
            )
        self._isolated = problem is None
        if not self._isolated:
            log.warning(
                "grader isolation is WEAKER: %s; graders run with rlimits, an empty "
                "environment and a temp dir only (network and filesystem are the host's)",
                problem,
            )
        # Inside the namespaces /tmp is a private tmpfs; without them, a temp dir of our own.
        self._scratch = "/tmp" if self._isolated else tempfile.mkdtemp(prefix="rft-grader-")
        self._runner: subprocess.Popen | None = None
        self._buffer = b""
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
        if not self._isolated:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # -- one sample ---------------------------------------------------------------------------

    def _grade_one(self, sample: dict, item: dict) -> GradeResult:
        request = (json.dumps({"sample": sample, "item": item}, default=str) + "\n").encode()
        for _attempt in range(2):
            if self._runner is None and self._load_error is None:
                self._start_runner()
            if self._load_error is not None:
                return GradeResult.failed(self._load_error)
            try:
                self._runner.stdin.write(request)
                self._runner.stdin.flush()
                break
            except OSError:  # it died after its last reply (not this sample's doing): start afresh
                self._stop_runner()
        else:
            return GradeResult.failed("the sandbox runner keeps dying before taking a sample")
        try:
            reply = self._read_reply(self._limits.timeout_s + RUNNER_GRACE_S)
        except _RunnerFailure as e:
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
        label = spec.get("path", spec["name"])
        command = [sys.executable, "-I", str(RUNNER)]
        if self._isolated:
            command = [shutil.which("unshare"), *namespace_flags(), *command]
        self._runner = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**SANDBOX_ENV, "HOME": self._scratch, "TMPDIR": self._scratch},
            cwd="/" if self._isolated else self._scratch,
            start_new_session=True,
        )
        self._buffer = b""
        limits = self._limits
        config = {
            "grader": spec,
            "scratch": self._scratch,
            "isolated": self._isolated,
            "host_root": self._isolated and namespace_flags() == ROOT_NAMESPACE_FLAGS,
            "limits": {
                "timeout_s": limits.timeout_s,
                "cpu_s": limits.cpu_s,
                "memory_mb": limits.memory_mb,
                "max_output_bytes": limits.max_output_bytes,
                "max_processes": MAX_PROCESSES,
                "max_file_bytes": MAX_FILE_BYTES,
                "max_open_files": MAX_OPEN_FILES,
            },
        }
        try:
            self._runner.stdin.write((json.dumps(config) + "\n").encode())
            self._runner.stdin.flush()
            reply = self._read_reply(LOAD_TIMEOUT_S)
        except (OSError, _RunnerFailure) as e:
            stderr = self._stop_runner()
            self._load_error = (
                f"grader {label}: the sandbox runner failed to start or to load it ({e}) {stderr}"
            ).strip()
            return
        if "setup_error" in reply:  # the machine's fault, not the grader's: do not score 0 quietly
            self._stop_runner()
            problem = redact(str(reply["setup_error"]), known_secrets(self._extra_secrets))[0]
            raise SandboxUnavailableError(f"the grader sandbox could not be set up: {problem}")
        if "load_error" in reply:
            self._load_error = str(reply["load_error"])
            self._stop_runner()
        else:
            self.protections = list(reply.get("protections", []))

    def _read_reply(self, timeout_s: float) -> dict:
        """The runner's next JSON line, or _RunnerFailure if it dies, hangs or sends garbage."""
        deadline = time.monotonic() + timeout_s
        stdout = self._runner.stdout.fileno()
        # The runner caps a result at max_output_bytes; re-encoding as ASCII JSON can triple it.
        max_line = 4 * self._limits.max_output_bytes + MAX_ERROR_CHARS
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                raise _RunnerFailure(f"did not answer within {timeout_s:g} s")
            chunk = os.read(stdout, 65536)
            if not chunk:
                raise _RunnerFailure(f"died ({self._exit_description()})")
            self._buffer += chunk
            if len(self._buffer) > max_line:
                raise _RunnerFailure("sent an oversized reply")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise _RunnerFailure("sent a malformed reply") from None
        if not isinstance(reply, dict):
            raise _RunnerFailure("sent a malformed reply")
        return reply

    def _exit_description(self) -> str:
        try:
            code = self._runner.wait(timeout=RUNNER_GRACE_S)
        except subprocess.TimeoutExpired:
            return "closed its output but kept running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"

    def _stop_runner(self) -> str:
        """Kill the runner's whole process group (and with it its pid namespace); returns the
        start of what it wrote to stderr, for diagnosing a runner that failed to start."""
        runner, self._runner = self._runner, None
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.wait()
        os.set_blocking(runner.stderr.fileno(), False)
        try:
            stderr = (runner.stderr.read(2000) or b"").decode(errors="replace").strip()
        except OSError:
            stderr = ""
        for pipe in (runner.stdin, runner.stdout, runner.stderr):
            try:
                pipe.close()
            except OSError:  # stdin's buffered bytes cannot be flushed into a dead runner
                pass
        return stderr
