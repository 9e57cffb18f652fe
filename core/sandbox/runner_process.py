"""The trusted side of one sandbox runner (runner.py): how it is started (under `unshare`, with an
empty environment), given its config, read one JSON line at a time and stopped (its whole
process group, and with it its pid namespace). Shared by the grader sandbox
(reward_workers/sandbox.py) and the session sandbox (session.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.sandbox.namespaces import (
    ROOT_NAMESPACE_FLAGS,
    SANDBOX_ENV,
    SandboxUnavailableError,
    namespace_flags,
    namespace_problem,
)
from core.sandbox.redaction import known_secrets, redact
from core.sandbox.root import package_location, read_only_paths
from core.sandbox.target import SandboxLimits, SandboxTarget

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
LOAD_TIMEOUT_S = 60.0  # runner start + target import (+ describe())
RUNNER_GRACE_S = 5.0  # beyond a call's timeout: fork, kill and clean-up of one child
MAX_ERROR_CHARS = 4000


class RunnerFailure(Exception):
    """The runner died, hung or broke the protocol."""


class TargetLoadError(Exception):
    """The runner could not start or load the target: every call fails with this reason."""


@dataclass
class Isolation:
    """Decided once per sandbox: namespaces, or (when allowed) rlimits and a temp dir only."""

    isolated: bool
    scratch: str  # where the children's working directories go, as the runner sees it

    @classmethod
    def decide(cls, limits: SandboxLimits, role: str) -> Isolation:
        problem = namespace_problem()
        if problem and not limits.allow_weak_isolation:
            raise SandboxUnavailableError(
                f"cannot isolate {role}s: {problem}. {role.capitalize()}s would run with network access "
                f"and the host's filesystem; set {limits.weak_isolation_key}=true to accept that."
            )
        if problem:
            log.warning(
                "%s isolation is WEAKER: %s; %ss run with rlimits, an empty environment and a temp "
                "dir only (network and filesystem are the host's)",
                role,
                problem,
                role,
            )
        # Inside the namespaces /tmp is a private tmpfs; without them, a temp dir of our own.
        return cls(problem is None, "/tmp" if problem is None else tempfile.mkdtemp(prefix=f"rft-{role}-"))

    @property
    def host_root(self) -> bool:
        return self.isolated and namespace_flags() == ROOT_NAMESPACE_FLAGS

    def clean_up(self) -> None:
        if not self.isolated:
            shutil.rmtree(self.scratch, ignore_errors=True)


class RunnerProcess:
    """One runner process for `target`; start() it, then send() and read_reply()."""

    def __init__(
        self,
        target: SandboxTarget,
        limits: SandboxLimits,
        mode: str,
        isolation: Isolation,
        secrets: tuple[str, ...] = (),
    ):
        self.target, self.limits, self.mode, self.isolation = target, limits, mode, isolation
        self._secrets = secrets
        self._process: subprocess.Popen | None = None
        self._buffer = b""
        # A reply is capped at max_output_bytes by the runner; re-encoding as ASCII JSON can triple it.
        self.max_line = 4 * limits.max_output_bytes + MAX_ERROR_CHARS

    @property
    def pid(self) -> int | None:
        """The process at the top of the runner's group (`unshare`, or the runner itself)."""
        return self._process.pid if self._process else None

    def start(self) -> dict:
        """Start the runner and load the target; returns the load reply ("protections",
        "description"). Raises TargetLoadError (the target's fault, or a runner that would not
        start) or SandboxUnavailableError (the machine's: the sandbox cannot be set up)."""
        target, isolation = self.target, self.isolation
        module = target.factory.partition(":")[0]
        try:
            package, python_path = package_location(module)
        except (ImportError, ValueError) as e:
            raise TargetLoadError(f"{target.label}: factory {target.factory}: {e}") from None
        command = [sys.executable, "-I", str(RUNNER)]
        if isolation.isolated:
            command = [shutil.which("unshare"), *namespace_flags(), *command]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**SANDBOX_ENV, "HOME": isolation.scratch, "TMPDIR": isolation.scratch},
            cwd="/" if isolation.isolated else isolation.scratch,
            start_new_session=True,
        )
        config = {
            "mode": self.mode,
            "factory": target.factory,
            "spec": target.spec,
            "label": target.label,
            "role": target.role,
            "python_path": [python_path],
            "read_only": read_only_paths([package, *target.mounts]),
            "scratch": isolation.scratch,
            "isolated": isolation.isolated,
            "host_root": isolation.host_root,
            "loopback": target.loopback,
            "limits": self.limits.for_runner(),
        }
        try:
            self.send(config)
            reply = self.read_reply(LOAD_TIMEOUT_S)
        except (OSError, RunnerFailure) as e:
            stderr = self.stop()
            raise TargetLoadError(
                f"{target.label}: the sandbox runner failed to start or to load it ({e}) {stderr}".strip()
            ) from None
        if "setup_error" in reply:  # the machine's fault, not the target's: do not fail calls quietly
            self.stop()
            problem = redact(str(reply["setup_error"]), known_secrets(self._secrets))[0]
            raise SandboxUnavailableError(f"the {target.role} sandbox could not be set up: {problem}")
        if "load_error" in reply:
            self.stop()
            raise TargetLoadError(str(reply["load_error"]))
        return reply

    def send(self, message: dict) -> None:
        """One line to the runner; OSError if it is gone."""
        self._process.stdin.write((json.dumps(message, default=str) + "\n").encode())
        self._process.stdin.flush()

    def read_reply(self, timeout_s: float | None) -> dict:
        """The runner's next JSON line, or RunnerFailure if it dies, hangs (None: wait for ever)
        or sends garbage."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stdout = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([stdout], [], [], wait)
            if not readable:
                raise RunnerFailure(f"did not answer within {timeout_s:g} s")
            chunk = os.read(stdout, 65536)
            if not chunk:
                raise RunnerFailure(f"died ({self._exit_description()})")
            self._buffer += chunk
            if len(self._buffer) > self.max_line:
                raise RunnerFailure("sent an oversized reply")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise RunnerFailure("sent a malformed reply") from None
        if not isinstance(reply, dict):
            raise RunnerFailure("sent a malformed reply")
        return reply

    def _exit_description(self) -> str:
        try:
            code = self._process.wait(timeout=RUNNER_GRACE_S)
        except subprocess.TimeoutExpired:
            return "closed its output but kept running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"

    def kill(self) -> None:
        """SIGKILL the runner's whole process group (safe from any thread; stop() cleans up)."""
        process = self._process
        if process is None or process.returncode is not None:  # reaped: its pid may be reused
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> str:
        """Kill the runner and reap it; returns the start of what it wrote to stderr, for
        diagnosing a runner that failed to start. Only the thread that reads may call it."""
        if self._process is None:
            return ""
        self.kill()
        runner, self._process = self._process, None
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
