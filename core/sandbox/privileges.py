"""The sandbox's identity: after the runner has built its root (root.py) it gives up everything
that would let untrusted code read host-root files or undo the sandbox.

become_nobody(): the runner ends as uid/gid 65534 ("nobody") in a user namespace of its own,
with no supplementary groups. When the service runs as host root the runner starts without a
user namespace (namespaces.namespace_flags) and first changes its host uid to 65534, so files are
checked against host nobody: a root-only file bound in stays unreadable. Otherwise the runner's
namespace root is the service's own (unprivileged) user, which it cannot change without a
setuid helper; it is then 65534 inside the namespace and the service user on the host. The new
user namespace also gets a mount namespace of its own: the runner's mounts, now owned by a more
privileged namespace, are locked (cannot be unmounted to reveal what lies below), and its
process count (RLIMIT_NPROC) is counted per sandbox, not per host uid.
drop_capabilities(): no capabilities (bounding set included), no_new_privs, not dumpable.
"""

from __future__ import annotations

import ctypes
import os

from core.sandbox.root import NOBODY, check, libc

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# A pid namespace's own pid_max (settable since Linux 6.14) caps its process count. This
# matters when the service runs as root: RLIMIT_NPROC never applies to processes whose real
# uid is host root. The kernel refuses a pid_max below 301, and after pids first wrap it
# allocates only from RESERVED_PIDS up; so we set pid_max = RESERVED_PIDS + cap and move the pid
# cursor past RESERVED_PIDS at once.
RESERVED_PIDS = 300


def _write_proc(path: str, value: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, value.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cap_pid_namespace(max_processes: int) -> str | None:
    """Cap the number of processes in our pid namespace; None on kernels before 6.14, where
    pid_max is global: namespace root mapped onto host root could write it for the whole host."""
    release = tuple(int(part) for part in os.uname().release.split(".")[:2] if part.isdigit())
    pid_max = "/proc/sys/kernel/pid_max"
    if release < (6, 14) or not _write_proc(pid_max, str(RESERVED_PIDS + max_processes)):
        return None
    if _write_proc("/proc/sys/kernel/ns_last_pid", str(RESERVED_PIDS)):
        return f"at most {max_processes} processes (pid namespace)"
    return f"at most {RESERVED_PIDS + max_processes - 1} processes (pid namespace)"


def become_nobody(host_root: bool) -> str:
    """Become uid/gid NOBODY in a new user (and mount) namespace; returns what was done.
    `host_root`: the runner is host root (no user namespace yet) and can become host nobody."""
    if host_root:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # clears every capability
        # and makes us not dumpable: /proc/self would be root's, its uid_map not ours to write
        check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare a user namespace")
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{NOBODY} {outer_uid} 1"),
        ("gid_map", f"{NOBODY} {outer_gid} 1"),
    ):
        if not _write_proc(f"/proc/self/{name}", text):
            raise RuntimeError(f"cannot write /proc/self/{name} of the sandbox's user namespace")
    if os.getuid() != NOBODY or os.getgid() != NOBODY:
        raise RuntimeError(f"still uid {os.getuid()} gid {os.getgid()} after the user namespace")
    if host_root:
        return f"uid {NOBODY} (host nobody; no groups)"
    return f"uid {NOBODY} in its user namespace (the service's own user on the host)"


def drop_capabilities() -> None:
    """The runner holds every capability in its user namespace; without this untrusted code could
    unmount the private /tmp or make / writable again."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop bounding capability")
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    # Not dumpable: untrusted code (same uid) cannot ptrace the runner or write its /proc/1/mem.
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
