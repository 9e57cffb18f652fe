"""The program that runs inside the sandbox (started by runner_process.py).

It runs as `python -I`: before it hides the host's files it imports only this package's runner
modules (standard library). Then it hardens itself and imports the target's factory, named in
its config, inside the sandbox; it imports neither reward_workers nor rollout_workers itself.
Protocol, JSON lines over stdin/stdout:
  parent -> {"mode": "grade"|"session", "factory": "pkg.module:function", "spec", "label",
             "role", "python_path", "read_only", "scratch", "isolated", "host_root", "limits"}
  runner -> {"protections": [...], "description": ...} once the target is built,
            or {"load_error"/"setup_error": "..."}
grade:   parent -> {"args": [...]}   runner -> {"value": <what target(*args) returned>} or {"error"}
         (one line per call, each in a fresh forked child: children.py)
session: episodes.py (one long-lived child per episode). The target's optional describe() is
         run once at load, in a fresh child, and its value sent as "description".
"""

import fcntl
import gc
import importlib
import json
import os
import resource
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from core.sandbox.children import call_once  # noqa: E402 - needs the checkout on the path (above)
from core.sandbox.episodes import EpisodeHost  # noqa: E402
from core.sandbox.privileges import become_nobody, cap_pid_namespace, drop_capabilities  # noqa: E402
from core.sandbox.root import build_minimal_root, set_read_only  # noqa: E402

READ_CHUNK = 65536
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # linux/sockios.h, linux/if.h
IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in a 24-byte union


def bring_up_loopback() -> None:
    """`ip link set lo up` in this (new, empty) network namespace: needs CAP_NET_ADMIN over it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        _, flags = struct.unpack(IFREQ, fcntl.ioctl(probe, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def harden(read_only: list[str], max_processes: int, host_root: bool, loopback: bool = False) -> list[str]:
    """Run as pid 1 of fresh net, pid and mount namespaces (and, unless the service is host
    root, a user namespace): move into the minimal root, become nobody, then give up every
    capability. Returns what is enforced."""
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise RuntimeError(f"the network namespace has interfaces {interfaces}")
    protections = ["no network (empty network namespace)", "own pid namespace"]
    if loopback:
        bring_up_loopback()
        protections[0] = "no network (own network namespace: its loopback only)"
    process_cap = cap_pid_namespace(max_processes)  # (before /proc becomes read-only)
    if process_cap:
        protections.append(process_cap)
    build_minimal_root(read_only)
    protections += [
        f"minimal root: {len(read_only)} read-only mounts, private /tmp, minimal /dev and /etc",
        "read-only filesystem",
    ]
    protections.append(become_nobody(host_root))
    set_read_only("/proc")
    drop_capabilities()
    protections.append("no capabilities")
    return protections


def sandbox_processes(mode: str, limits: dict) -> int:
    """The pid namespace's cap: the runner, and each child with the processes it may add."""
    children = 1 if mode == "grade" else limits["max_episodes"] + 1  # + a describe() or spare fork
    return 1 + children * (1 + limits["max_processes"])


def set_runner_limits(limits: dict, mode: str) -> None:
    """Limits that every process in the sandbox inherits. Each child adds the CPU limit and the
    process limit, and lowers the open-files limit to its own (children.confine)."""
    # Session mode: the runner holds 4 descriptors per open episode (3 pipes and a pidfd).
    descriptors = limits["max_open_files"] + (4 * limits["max_episodes"] + 16 if mode == "session" else 0)
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024),
        (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, descriptors),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def load_factory(name: str):
    """The function named "package.module:function"."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def read_lines(fd: int, pending: bytes = b""):
    """The JSON messages arriving on `fd`, one per line, until it closes."""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield json.loads(line)
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return
        pending += chunk


def read_config(fd: int) -> tuple[dict, bytes]:
    """The first line, and whatever came after it (nothing: the parent waits for our answer)."""
    pending = b""
    while b"\n" not in pending:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            raise SystemExit("no config")
        pending += chunk
    line, pending = pending.split(b"\n", 1)
    return json.loads(line), pending


def main() -> None:
    # Keep the protocol on private descriptors; whatever the target prints goes nowhere.
    requests_fd = os.dup(0)
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    config, pending = read_config(requests_fd)
    limits, mode, role, scratch = config["limits"], config["mode"], config["role"], config["scratch"]
    try:
        protections = []
        if config["isolated"]:
            protections = harden(
                config["read_only"], sandbox_processes(mode, limits), config["host_root"], config["loopback"]
            )
        os.chdir(scratch)
        set_runner_limits(limits, mode)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which refuses to go on
        reply({"setup_error": f"{type(e).__name__}: {e}"})
        return
    try:
        sys.path[:0] = config["python_path"]
        target = load_factory(config["factory"])(config["spec"])
    except BaseException as e:  # noqa: BLE001 - reported to the parent: every call fails with it
        reply({"load_error": f"{config['label']} failed to load: {type(e).__name__}: {e}"})
        return
    description = None
    if mode == "session" and callable(getattr(target, "describe", None)):
        described = call_once(target.describe, [], limits, scratch, role)
        if "error" in described:
            reply({"load_error": f"{config['label']} failed to describe itself: {described['error']}"})
            return
        description = described["value"]
    gc.freeze()  # forked children then do not copy the loaded objects' pages when the GC runs
    reply({"protections": protections, "description": description})
    if mode == "grade":
        for request in read_lines(requests_fd, pending):
            reply(call_once(target, request["args"], limits, scratch, role))
    else:
        EpisodeHost(target, limits, scratch, role, reply).serve(requests_fd, pending)


if __name__ == "__main__":
    main()
