"""The sandbox runner's forked children: how each is confined, how what it returns or raises is
reported, and one call in a fresh child (grade mode: a crash, hang or fork bomb costs only that
call, and a call costs a fork, not a Python start). Session mode keeps its children alive
between calls (episodes.py) and confines them the same way.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import tempfile
import time
import traceback

from core.sandbox.root import check, libc
from core.sandbox.target import TargetInputError

PR_SET_PDEATHSIG = 1
MAX_SUMMARY_CHARS, MAX_TRACE_CHARS = 1000, 2000


def confine(limits: dict, workdir: str, output_fd: int, keep: tuple[int, ...], max_processes: int) -> None:
    """In a freshly forked child: its own process group, death with the runner, stdout and
    stderr into `output_fd`, every descriptor but 0-2 and `keep` closed (the runner's protocol
    pipes among them: the code cannot forge the runner's replies), cwd and TMPDIR `workdir`,
    and the CPU and process limits (the runner itself must not carry RLIMIT_NPROC: without a
    user namespace it counts all the user's processes on the host)."""
    os.setpgid(0, 0)
    # Die with the runner even without a pid namespace (which would otherwise see to it).
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    # The runner may hold more (a session's episodes' pipes); the child gets what the limits say.
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    os.chdir(workdir)
    os.environ["TMPDIR"] = tempfile.tempdir = workdir
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))


def failure(error: BaseException, role: str, limits: dict) -> dict:
    """The reply for what the target raised."""
    if isinstance(error, MemoryError):
        return {"error": f"exceeded the memory limit ({limits['memory_mb']} MB)"}
    if isinstance(error, TargetInputError):  # the input lacks what the spec names: the message says it all
        return {"error": f"{role} input: {error}"}
    summary = "".join(traceback.format_exception_only(error)).strip()[:MAX_SUMMARY_CHARS]
    trace = "".join(traceback.format_exception(error))[-MAX_TRACE_CHARS:]
    return {"error": f"{role} raised {summary}\n{trace}"}


def _as_json_number(value):
    """json.dumps fallback: numpy scalars and other number-likes become floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{type(value).__name__} is not a number") from None


def encode_reply(payload: dict, role: str, ensure_ascii: bool = True) -> bytes:
    try:
        return json.dumps(payload, default=_as_json_number, ensure_ascii=ensure_ascii).encode()
    except Exception as e:  # noqa: BLE001 - e.g. not a number, or nested too deep
        return json.dumps({"error": f"{role}'s result cannot be encoded: {e}"[:MAX_TRACE_CHARS]}).encode()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _call_in_child(
    function, args: list, limits: dict, role: str, workdir: str, result_fd: int, output_fd: int
):
    """In the forked child: confine, call, write one JSON result, exit. Never returns: whatever
    happens, this process must not fall back into the runner's loop."""
    pid = os.getpid()
    try:
        try:
            confine(limits, workdir, output_fd, keep=(result_fd,), max_processes=limits["max_processes"])
            payload = {"value": function(*args)}
        except BaseException as e:  # noqa: BLE001 - anything the target raises fails this call only
            payload = failure(e, role, limits)
        if os.getpid() == pid:  # processes the target forked must not report a result
            write_all(result_fd, encode_reply(payload, role))
    finally:
        os._exit(0)


def _read_child(exited_fd: int, result_fd: int, output_fd: int, limits: dict) -> tuple[bytes, str | None]:
    """Collect the child's result until it exits, bounding its output and its wall-clock time.
    Returns (result bytes, reason it was stopped or None)."""
    result, output_bytes, child_exited = b"", 0, False
    open_fds = [exited_fd, result_fd, output_fd]
    deadline = time.monotonic() + limits["timeout_s"]
    while open_fds:
        # Once the child is gone, only drain what is already there: a grandchild may hold the pipes.
        wait = 0.0 if child_exited else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select(open_fds, [], [], wait)
        if not readable and child_exited:
            return result, None
        if not readable:
            return result, f"timed out after {limits['timeout_s']:g} s (wall-clock limit)"
        for fd in readable:
            chunk = b"" if fd == exited_fd else os.read(fd, 65536)
            if fd == exited_fd:
                child_exited = True
            elif fd == result_fd:
                result += chunk
            else:
                output_bytes += len(chunk)
            if not chunk:
                open_fds.remove(fd)
        if max(output_bytes, len(result)) > limits["max_output_bytes"]:
            return result, f"wrote more than {limits['max_output_bytes']} bytes of output"
    return result, None


def _kill_leftovers(child: int) -> tuple[int, resource.struct_rusage]:
    """Kill the child's process group and, when we are the pid namespace's init, every other
    process in the namespace (daemons that left the group too), and reap them. Returns the
    child's wait status and resource usage."""
    for target in [child, -child] + ([-1] if os.getpid() == 1 else []):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status, usage = os.wait4(child, 0)
    while os.getpid() == 1:  # as init we inherit the orphans
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return status, usage


def describe_exit(status: int, usage: resource.struct_rusage, limits: dict, role: str, before: str) -> str:
    """Why a child ended before `before` ("returning", "replying")."""
    signalled = os.WIFSIGNALED(status)
    # SIGXCPU at the soft limit; SIGKILL at the hard one (soft + 1 s) if SIGXCPU was caught.
    cpu_s = usage.ru_utime + usage.ru_stime
    if (signalled and os.WTERMSIG(status) == signal.SIGXCPU) or cpu_s >= limits["cpu_s"]:
        return f"exceeded the CPU-time limit of {limits['cpu_s']} s"
    if signalled:
        return f"{role} process was killed by {signal.Signals(os.WTERMSIG(status)).name} before {before}"
    return f"{role} process exited with status {os.waitstatus_to_exitcode(status)} before {before}"


def call_once(function, args: list, limits: dict, scratch: str, role: str) -> dict:
    """function(*args) in a fresh confined child: {"value": ...} or {"error": "..."}. Only one
    at a time: it kills every other process of the pid namespace afterwards."""
    workdir = tempfile.mkdtemp(dir=scratch)  # fresh per call: calls cannot see each other's files
    result_r, result_w = os.pipe()
    output_r, output_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(result_r)
        os.close(output_r)
        _call_in_child(function, args, limits, role, workdir, result_w, output_w)
    os.close(result_w)
    os.close(output_w)
    exited = os.pidfd_open(child)
    result, reason = _read_child(exited, result_r, output_r, limits)
    status, usage = _kill_leftovers(child)
    for fd in (exited, result_r, output_r):
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    if reason is None:
        try:
            return json.loads(result)
        except ValueError:
            reason = describe_exit(status, usage, limits, role, before="returning")
    return {"error": reason}
