"""The program that runs inside the grader sandbox (started by reward_workers/sandbox.py).

It runs as `python -I`: of the rft package it imports only the grader library
(reward_workers/graders/, standard library at import time), before it hides the host's files.
Protocol, JSON lines over stdin/stdout:
  parent -> {"grader": spec, "scratch", "isolated", "limits": {...}}  (python code inlined)
  runner -> {"protections": [...]} once the grader is built, or {"load_error"/"setup_error": "..."}
  parent -> {"sample": {...}, "item": {...}}        (one line per sample)
  runner -> {"value": <what grade() returned>} or {"error": "..."}
The grader is loaded once; each sample is graded in a forked child, so a crash, hang or fork
bomb costs only that sample, and the per-sample cost is a fork, not a Python start.
"""

import gc
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
from reward_workers.graders import build_grader  # noqa: E402 - needs the path above
from reward_workers.graders.templates import GraderInputError  # noqa: E402
from reward_workers.sandbox_privileges import (  # noqa: E402
    become_nobody,
    cap_pid_namespace,
    drop_capabilities,
)
from reward_workers.sandbox_root import (  # noqa: E402
    build_minimal_root,
    check,
    libc,
    read_only_paths,
    set_read_only,
)

PR_SET_PDEATHSIG = 1


def harden(spec: dict, max_processes: int, host_root: bool) -> list[str]:
    """Run as pid 1 of fresh net, pid and mount namespaces (and, unless the service is host
    root, a user namespace): move into the minimal root, become nobody, then give up every
    capability. Returns what is enforced."""
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise RuntimeError(f"the network namespace has interfaces {interfaces}")
    protections = ["no network (empty network namespace)", "own pid namespace"]
    process_cap = cap_pid_namespace(max_processes + 2)  # + the runner and the grading child
    if process_cap:  # (before /proc becomes read-only)
        protections.append(process_cap)
    paths = read_only_paths(spec)
    build_minimal_root(paths)
    protections += [
        f"minimal root: {len(paths)} read-only mounts, private /tmp, minimal /dev and /etc",
        "read-only filesystem",
    ]
    protections.append(become_nobody(host_root))
    set_read_only("/proc")
    drop_capabilities()
    protections.append("no capabilities")
    return protections


def set_runner_limits(limits: dict) -> None:
    """Limits that every process in the sandbox inherits. Each child adds the CPU limit and the
    process limit (without a user namespace RLIMIT_NPROC counts all the user's processes on
    the host, so the runner itself must not carry it)."""
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024),
        (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _as_json_number(value):
    """json.dumps fallback: numpy scalars and other number-likes become floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{type(value).__name__} is not a number") from None


def _encode_result(payload: dict) -> bytes:
    try:
        return json.dumps(payload, default=_as_json_number).encode()
    except Exception as e:  # noqa: BLE001 - e.g. not a number, or nested too deep
        return json.dumps({"error": f"grader's result cannot be encoded: {e}"[:2000]}).encode()


def run_child(grade, request: dict, limits: dict, workdir: str, result_fd: int, output_fd: int) -> None:
    """In the forked child: confine, grade, write one JSON result, exit. Never returns: whatever
    happens, this process must not fall back into the runner's loop."""
    pid = os.getpid()
    try:
        try:
            os.setpgid(0, 0)
            # Die with the runner even without a pid namespace (which would otherwise see to it).
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.closerange(3, result_fd)  # close the protocol pipes: the grader cannot forge replies
            os.closerange(result_fd + 1, limits["max_open_files"])
            os.chdir(workdir)
            resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
            payload = {"value": grade(request["sample"], request["item"])}
        except MemoryError:
            payload = {"error": f"exceeded the memory limit ({limits['memory_mb']} MB)"}
        except GraderInputError as e:  # the item lacks what the spec names: the message says it all
            payload = {"error": f"grader input: {e}"}
        except BaseException as e:  # noqa: BLE001 - anything the grader raises scores 0
            summary = "".join(traceback.format_exception_only(e)).strip()[:1000]
            trace = "".join(traceback.format_exception(e))[-2000:]
            payload = {"error": f"grader raised {summary}\n{trace}"}
        if os.getpid() == pid:  # processes the grader forked must not report a result
            os.write(result_fd, _encode_result(payload))
    finally:
        os._exit(0)


def read_child(exited_fd: int, result_fd: int, output_fd: int, limits: dict) -> tuple[bytes, str | None]:
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


def kill_leftovers(child: int) -> tuple[int, resource.struct_rusage]:
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


def describe_failure(status: int, usage: resource.struct_rusage, limits: dict) -> str:
    signalled = os.WIFSIGNALED(status)
    # SIGXCPU at the soft limit; SIGKILL at the hard one (soft + 1 s) if SIGXCPU was caught.
    cpu_s = usage.ru_utime + usage.ru_stime
    if (signalled and os.WTERMSIG(status) == signal.SIGXCPU) or cpu_s >= limits["cpu_s"]:
        return f"exceeded the CPU-time limit of {limits['cpu_s']} s"
    if signalled:
        return f"grader process was killed by {signal.Signals(os.WTERMSIG(status)).name} before returning"
    return f"grader process exited with status {os.waitstatus_to_exitcode(status)} before returning"


def grade_sample(grade, request: dict, limits: dict, scratch: str) -> dict:
    workdir = tempfile.mkdtemp(dir=scratch)  # fresh per sample: samples cannot see each other's files
    result_r, result_w = os.pipe()
    output_r, output_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(result_r)
        os.close(output_r)
        run_child(grade, request, limits, workdir, result_w, output_w)
    os.close(result_w)
    os.close(output_w)
    exited = os.pidfd_open(child)
    result, reason = read_child(exited, result_r, output_r, limits)
    status, usage = kill_leftovers(child)
    for fd in (exited, result_r, output_r):
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    if reason is None:
        try:
            return json.loads(result)
        except ValueError:
            reason = describe_failure(status, usage, limits)
    return {"error": reason}


def main() -> None:
    # Keep the protocol on private descriptors; whatever the grader module prints goes nowhere.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    config = json.loads(requests.readline())
    limits = config["limits"]
    spec = config["grader"]
    try:
        protections = harden(spec, limits["max_processes"], config["host_root"]) if config["isolated"] else []
        os.chdir(config["scratch"])
        set_runner_limits(limits)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which refuses to go on
        reply({"setup_error": f"{type(e).__name__}: {e}"})
        return
    try:
        grade = build_grader(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which scores 0
        label = spec.get("path", spec["name"])
        reply({"load_error": f"grader {label} failed to load: {type(e).__name__}: {e}"})
        return
    gc.freeze()  # forked children then do not copy the loaded objects' pages when the GC runs
    reply({"protections": protections})
    for line in requests:
        reply(grade_sample(grade, json.loads(line), limits=limits, scratch=config["scratch"]))


if __name__ == "__main__":
    main()
