"""Killing one episode's processes while the other episodes of the sandbox live on (no cgroups).

Each episode's child is a child subreaper: whatever its processes fork stays in its tree, even
daemons that left its process group, while it lives. When it is gone its orphans pass to the
runner (the pid namespace's init, or a subreaper itself without one), where no live episode's
process ever is: so an episode's processes are its child's tree, plus any orphan of the runner.
"""

from __future__ import annotations

import os
import signal
import time

MAX_ROUNDS = 100  # of stopping newly found processes; each round stops all it finds
REAP_TIMEOUT_S = 5.0  # for killed processes to be gone (SIGKILL waits only on uninterruptible I/O)


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process in this /proc (the sandbox's own pid namespace)."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        parents[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return parents


def tree(roots: set[int], parents: dict[int, int]) -> set[int]:
    """`roots` (those that exist) and all their descendants."""
    found = roots & parents.keys()
    while True:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        if not more:
            return found
        found |= more


def orphans(keep: set[int]) -> set[int]:
    """The runner's children that are not in `keep` (its live episodes' children)."""
    me = os.getpid()
    return {pid for pid, parent in parent_pids().items() if parent == me and pid not in keep}


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def kill_trees(roots: set[int]) -> None:
    """SIGKILL every process of the trees under `roots` and wait until they are gone (reaping
    them as they become our children). They are stopped first, round after round until a round
    finds none it has not stopped, so that none forks away meanwhile."""
    stopped: set[int] = set()
    for _ in range(MAX_ROUNDS):
        found = tree(roots | stopped, parent_pids()) - stopped
        if not found:
            break
        _signal(found, signal.SIGSTOP)
        stopped |= found
    _signal(stopped | roots, signal.SIGKILL)
    _wait_gone(stopped | roots)


def _wait_gone(pids: set[int]) -> None:
    """Reap the killed processes: each is ours once its parent (also killed) is gone."""
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.waitpid(pid, 0)
                pids.discard(pid)
            except ChildProcessError:  # not ours yet (its dying parent's), or reaped already
                if not os.path.exists(f"/proc/{pid}"):
                    pids.discard(pid)
