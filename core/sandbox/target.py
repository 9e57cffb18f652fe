"""What a sandbox runs and under which limits: plain data, used on both sides of the sandbox
(standard library only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIB = 1024 * 1024


class TargetInputError(ValueError):
    """Raised by a target whose input lacks what its spec names: reported as `<role> input:
    <message>`, without a traceback (the message says it all)."""


@dataclass(frozen=True)
class SandboxTarget:
    """Untrusted code for the sandbox. The runner imports `factory` ("package.module:function")
    inside the sandbox and calls it once with `spec` (JSON-able); grade mode then calls what it
    returned once per request, session mode once per episode (see session.py)."""

    factory: str
    spec: dict = field(default_factory=dict)
    label: str = "target"  # names it in load errors, e.g. "grader /jobs/a/grade.py"
    role: str = "target"  # the word its errors start with: "grader raised ...", "environment ..."
    mounts: tuple[str, ...] = ()  # its own files, bound read-only into the sandbox's root
    # The network namespace's loopback up (still no route out of the sandbox): for targets that
    # talk HTTP among their own processes, e.g. an agent program and the endpoint it calls.
    loopback: bool = False


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock of one call (grade: one sample); session calls may pass their own
    cpu_s: int = 5  # CPU seconds of one child: a sample, or a whole episode
    memory_mb: int = 1024  # address space of each process
    max_output_bytes: int = 65536  # stdout + stderr of one call, and its reply
    max_processes: int = 64  # processes one child may add
    max_file_bytes: int = 16 * MIB
    max_open_files: int = 256
    max_episodes: int = 64  # session mode: episodes open at once in one sandbox
    allow_weak_isolation: bool = False  # run without namespaces where they cannot be made
    weak_isolation_key: str = "allow_weak_isolation"  # the config key of that, named in the refusal

    def for_runner(self) -> dict:
        """The limits as the runner gets them (JSON)."""
        limits = asdict(self)
        del limits["allow_weak_isolation"], limits["weak_isolation_key"]
        return limits
