"""The versioned channel from the learner to the rollout workers.

Transport: the Ray object store. The learner's `export_adapter` returns an ObjectRef; that one
reference goes to every worker, and Ray moves the tensors once per node — they never pass
through the driver. Workers verify the checksum and refuse versions that are not newer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray


@dataclass
class SyncResult:
    version: int
    seconds: float  # publish until every worker had loaded it (includes queueing behind generation)
    load_seconds: float  # the slowest worker's own load time


class WeightSyncChannel:
    def __init__(self) -> None:
        self.version = 0  # version 0 = the base model, which every worker starts with
        self._latest_ref: ray.ObjectRef | None = None

    def publish(self, version: int, adapter_ref: ray.ObjectRef, workers: list) -> SyncResult:
        """Send version `version` to every worker and wait until each has loaded it.

        Calls on an actor run in submission order, so a worker applies it after any generation
        already queued on it (that generation keeps the version it started with)."""
        if version <= self.version:
            raise ValueError(f"publishing version {version} after {self.version}: versions must increase")
        started = time.perf_counter()
        loaded = ray.get([worker.load_adapter.remote(adapter_ref) for worker in workers])
        if any(v != version for v in loaded):
            raise RuntimeError(f"workers loaded versions {loaded}, expected {version}")
        seconds = time.perf_counter() - started
        load_seconds = max(ray.get([worker.last_load_seconds.remote() for worker in workers]))
        self.version, self._latest_ref = version, adapter_ref
        return SyncResult(version, seconds, load_seconds)

    def catch_up(self, worker) -> ray.ObjectRef | None:
        """Bring a new (or replacement) worker to the current version; returns the ack ref."""
        if self._latest_ref is None:
            return None
        return worker.load_adapter.remote(self._latest_ref)
