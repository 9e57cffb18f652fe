"""code_tests: run model-written Python against the item's tests; reward = passed / total.

Tests (the `tests` template, default {{item.tests}}) are a list of:
- a string or {"name", "code"}: Python statements (usually asserts) run after the solution in
  its namespace, all in one fresh interpreter (code_harness.py) with anti-hacking probes;
- {"name", "stdin", "stdout"}: the solution run as a program, one fresh interpreter per test,
  its stdout compared line by line (trailing whitespace ignored).
The interpreters are children of the sandbox's grading child: same namespaces and rlimits, their
own process group, killed at `timeout_s` for all tests of a sample. Failing tests' names and
stack traces are kept as diagnostics. A probe hit (reads_tests, edits_tests, exit_before_tests,
forged_report) scores 0 with that hack flag.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from reward_workers.graders.templates import GraderInputError, last_code_block, render, render_text

HARNESS = Path(__file__).with_name("code_harness.py").read_text()  # read now: the sandbox may hide it
MAX_OUTPUT_BYTES = 1 << 20
MAX_DIAGNOSTIC_CHARS = 1500
PR_SET_PDEATHSIG = 1


def normalized_tests(tests) -> list[dict]:
    if not isinstance(tests, list) or not tests:
        raise GraderInputError("code_tests: the item's tests must be a non-empty list")
    normalized = []
    for i, test in enumerate(tests):
        if isinstance(test, str):
            test = {"code": test}
        if not isinstance(test, dict) or not ({"code"} <= test.keys() or {"stdin", "stdout"} <= test.keys()):
            raise GraderInputError(
                f"code_tests: test {i} must be a string, {{'code'}} or {{'stdin', 'stdout'}}"
            )
        normalized.append({**test, "name": str(test.get("name", f"test_{i}"))})
    names = [test["name"] for test in normalized]
    if len(set(names)) != len(names):
        raise GraderInputError(f"code_tests: test names repeat: {names}")
    return normalized


def _die_with_parent() -> None:
    """In the new process: killed with the grading child even without a pid namespace (weak
    isolation), where the sandbox's kill of the child's process group misses this new session."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_process(
    argv: list[str], stdin: bytes, deadline: float
) -> tuple[bytes, int | None, float, str | None]:
    """Run argv in its own process group until it exits or `deadline`, feeding stdin and keeping
    at most MAX_OUTPUT_BYTES of stdout. Returns (stdout, wait status or None, CPU s, why stopped)."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    os.set_blocking(process.stdin.fileno(), False)
    output, pending, stopped = b"", stdin, None
    readers, writers = [process.stdout], [process.stdin]
    while readers:
        remaining = deadline - time.monotonic()
        readable, writable, _ = select.select(readers, writers, [], max(0.0, remaining))
        if not readable and not writable:
            stopped = "timed out"
            break
        if writable:
            try:
                pending = pending[os.write(process.stdin.fileno(), pending[:65536]) :]
            except BrokenPipeError:
                pending = b""
            if not pending:
                process.stdin.close()
                writers = []
        if readable:
            chunk = os.read(process.stdout.fileno(), 65536)
            output += chunk
            if not chunk:
                readers = []
            elif len(output) > MAX_OUTPUT_BYTES:
                stopped = f"wrote more than {MAX_OUTPUT_BYTES} bytes"
                break
    if stopped:
        os.killpg(process.pid, signal.SIGKILL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = status  # reaped here (with its resource usage), not by Popen
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
    except ProcessLookupError:
        pass
    for pipe in (process.stdin, process.stdout):
        if not pipe.closed:
            pipe.close()
    return output, None if stopped else status, usage.ru_utime + usage.ru_stime, stopped


def _cpu_limited(status: int, cpu_s: float) -> bool:
    limit = resource.getrlimit(resource.RLIMIT_CPU)[0]
    by_signal = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU
    return by_signal or (limit != resource.RLIM_INFINITY and cpu_s >= limit)


def _assertion_tests(code: str, tests: list[dict], deadline: float) -> tuple[dict, set, list]:
    """{name: error or None} for the tests that ran, hack flags, diagnostics."""
    nonce = secrets.token_hex(16)
    request = json.dumps({"code": code, "tests": tests, "nonce": nonce}).encode()
    output, status, cpu_s, stopped = run_process([sys.executable, "-I", "-c", HARNESS], request, deadline)
    results, flags, done = {}, set(), False
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("nonce") != nonce:
            flags.add("forged_report")
            continue
        if "flag" in message:
            flags.add(str(message["flag"]))
        elif "test" in message:
            results[message["test"]] = None if message.get("passed") else str(message.get("error"))
        done = done or message.get("done") is True
    diagnostics = []
    if stopped:
        diagnostics.append(f"tests stopped: {stopped}")
    elif not done and not flags:
        if _cpu_limited(status, cpu_s):
            diagnostics.append("tests stopped: exceeded the CPU-time limit")
        else:  # os._exit, a signal to itself: it left before the tests finished
            flags.add("exit_before_tests")
    return results, flags, diagnostics


def _program_test(code: str, test: dict, deadline: float) -> str | None:
    """None if the program's stdout matches, else why not."""
    stdin = test["stdin"] if isinstance(test["stdin"], str) else json.dumps(test["stdin"])
    output, status, cpu_s, stopped = run_process([sys.executable, "-I", "-c", code], stdin.encode(), deadline)
    if stopped:
        return stopped
    if os.waitstatus_to_exitcode(status) != 0:
        return (
            "exceeded the CPU-time limit"
            if _cpu_limited(status, cpu_s)
            else f"exited with status {os.waitstatus_to_exitcode(status)}"
        )
    lines = lambda text: [line.rstrip() for line in text.rstrip().splitlines()]
    got = lines(output.decode(errors="replace"))
    if got != lines(str(test["stdout"])):
        return f"expected stdout {test['stdout']!r:.200}, got {output.decode(errors='replace')!r:.200}"
    return None


def build(spec: dict):
    def grade(sample: dict, item: dict) -> dict:
        tests = normalized_tests(render(spec["tests"], sample, item))
        code = last_code_block(render_text(spec["code"], sample, item), ("python", "py", "python3"))
        deadline = time.monotonic() + spec["timeout_s"]
        assertion_tests = [{"name": t["name"], "code": t["code"]} for t in tests if "code" in t]
        errors, flags, diagnostics = (
            _assertion_tests(code, assertion_tests, deadline) if assertion_tests else ({}, set(), [])
        )
        for test in tests:
            if "code" in test:
                errors.setdefault(test["name"], "did not run")
            else:
                errors[test["name"]] = _program_test(code, test, deadline)
        passed = sum(error is None for error in errors.values())
        diagnostics += [
            f"{name} failed: {error[-MAX_DIAGNOSTIC_CHARS:]}" for name, error in errors.items() if error
        ]
        pass_rate = passed / len(tests)
        return {
            "reward": 0.0 if flags else pass_rate,
            "components": {"pass_rate": pass_rate},
            "hack_flags": sorted(flags),
            "diagnostics": diagnostics,
        }

    return grade
