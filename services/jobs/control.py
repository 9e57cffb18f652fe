"""How a running job takes instructions from outside: the driver reads them between steps."""

from __future__ import annotations

from typing import Protocol

from services.jobs.registry import JobRegistry


class JobControl(Protocol):
    """Instructions a running job takes from outside (e.g. `rft scale` through the registry)."""

    def desired_rollout_workers(self) -> int | None:
        """How many rollout workers the job should have now; None = leave as is."""
        ...


class RegistryControl:
    """`rft scale` writes the desired worker count into the registry; the driver reads it here."""

    def __init__(self, registry: JobRegistry, job_id: str):
        self.registry, self.job_id = registry, job_id

    def desired_rollout_workers(self) -> int | None:
        return self.registry.desired_rollout_workers(self.job_id)
