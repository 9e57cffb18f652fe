"""Whether and how the sandbox's namespaces can be made here (`unshare`, probed once)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# As host root: no user namespace, so that the runner can become host nobody (privileges.py).
ROOT_NAMESPACE_FLAGS = ("--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL")
NAMESPACE_FLAGS = ("--user", "--map-root-user", *ROOT_NAMESPACE_FLAGS)
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class SandboxUnavailableError(RuntimeError):
    """Untrusted code cannot be isolated here and the config does not accept weaker isolation,
    or the sandbox could not be set up on this machine."""


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
