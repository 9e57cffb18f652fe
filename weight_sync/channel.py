"""The versioned channel from the learner to the rollout workers.

`publish(version, weights_ref, workers)` hands one version to every worker over the configured
transport (`weight_sync/transports.py`) and waits until each serves it. Every delivery ends in
the worker's `receive_weights` (`weight_sync/endpoints.py`), which answers a `LoadReport`. Every
version carries a sha256; a worker refuses weights that fail it, or that are not newer than what
it serves, and keeps its current weights. The channel then re-fetches the version for that
worker from the canonical object-store copy (`weights_ref`, as `FromObjectStore`), at most
`max_refetches` times, and raises `WeightSyncError` naming the worker and the reasons after
that. A failed transfer (e.g. a broken broadcast group) is re-fetched the same way, and the
transport is reset. A dead worker's RayActorError propagates: its replacement is caught up with
`catch_up`, from the same canonical copy.

A worker loads a version once the requests it is running finish (each completion comes from one
version); requests it holds or receives meanwhile start on the new weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from .endpoints import LoadReport
from .transports import ObjectStoreTransport, Transport, deliver_from_object_store, make_transport

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A worker kept refusing (or failing to receive) a published version."""


@dataclass
class SyncResult:
    version: int
    seconds: float  # publish until every worker had loaded it (includes queueing behind generation)
    load_seconds: float  # the slowest worker's engine load time
    transport: str = "object_store"
    # Per worker id: publish until that worker served the version (queueing and re-fetches included).
    worker_seconds: dict[str, float] = field(default_factory=dict)
    # Per worker id: how long the sync kept it from generating (its sync calls' own durations).
    pause_seconds: dict[str, float] = field(default_factory=dict)
    # Per worker id, when any: why each delivery before the one it took was not taken.
    refetches: dict[str, list[str]] = field(default_factory=dict)


class WeightSyncChannel:
    def __init__(
        self, transport: Transport | None = None, learner=None, payload: str = "lora", max_refetches: int = 2
    ) -> None:
        if payload not in ("lora", "full"):
            raise ValueError(f"sync payload {payload!r}: expected lora or full")
        self.transport = transport or ObjectStoreTransport()
        self.learner, self.payload, self.max_refetches = learner, payload, max_refetches
        self.version = 0  # version 0 = the base model, which every worker starts with
        self._latest_ref: ray.ObjectRef | None = None

    @classmethod
    def from_config(cls, sync, learner, default_file_dir: str | None = None) -> "WeightSyncChannel":
        """The channel `sync` (services.config.SyncConfig) describes, sending from `learner`. The
        file transport writes to `sync.file_dir`, else `default_file_dir`, else a temporary dir."""
        transport = make_transport(
            sync.transport,
            learner,
            bucket_bytes=sync.bucket_mb * 2**20,
            timeout_s=sync.broadcast_timeout_s,
            file_root=sync.file_dir or default_file_dir,
        )
        return cls(transport, learner, sync.payload, sync.max_refetches)

    def export(self) -> ray.ObjectRef:
        """The sending learner's current policy in this channel's payload (an adapter or full
        weights). A learner group exports through its own `export`, which waits for every rank."""
        if self.learner is None:
            raise ValueError("this channel was made without a learner; export from the learner directly")
        _, weights = self.learner.export_policy.options(num_returns=2).remote(self.payload)
        return weights

    def replace_sender(self, learner) -> None:
        """Send from `learner` from now on (a restarted learner group's rank 0): the transport
        forgets the old one's state, e.g. a broadcast group it was rank 0 of."""
        self.learner = learner
        if hasattr(self.transport, "learner"):
            self.transport.learner = learner
        self.transport.reset()

    def publish(self, version: int, weights_ref: ray.ObjectRef, workers: list) -> SyncResult:
        """Send version `version` (an ObjectRef of AdapterWeights or FullWeights) to every worker
        and wait until each serves it."""
        if version <= self.version:
            raise ValueError(f"publishing version {version} after {self.version}: versions must increase")
        started = time.perf_counter()
        delivery = self.transport.deliver(weights_ref, version, workers)
        worker_of = {ack: index for index, ack in enumerate(delivery.acks)}
        pending = list(delivery.acks) + list(delivery.senders)
        reports: dict[int, LoadReport] = {}
        done_at: dict[int, float] = {}
        pauses, failures = [0.0] * len(workers), [[] for _ in workers]
        try:
            while pending:
                (ready,), pending = ray.wait(pending, num_returns=1)
                index = worker_of.pop(ready, None)
                report, failure = self._outcome(ready, version)
                if index is None:  # a learner-side call: its failure shows up in the workers' too
                    continue
                if report is not None:
                    pauses[index] += report.seconds
                if failure is None:
                    reports[index], done_at[index] = report, time.perf_counter() - started
                    continue
                failures[index].append(failure)
                if len(failures[index]) > self.max_refetches:
                    raise WeightSyncError(
                        f"worker {index} ({report.worker_id if report else 'no answer'}) "
                        "did not take version "
                        f"{version} after {len(failures[index])} deliveries: {failures[index]}"
                    )
                log.warning("worker %d: version %d not taken (%s); re-fetching it", index, version, failure)
                again = deliver_from_object_store(weights_ref, workers[index])
                worker_of[again] = index
                pending.append(again)
        except ray.exceptions.RayActorError:
            self.transport.reset()
            raise
        ids = [reports[i].worker_id for i in range(len(workers))]
        self.version, self._latest_ref = version, weights_ref
        return SyncResult(
            version,
            time.perf_counter() - started,
            load_seconds=max((r.load_seconds for r in reports.values()), default=0.0),
            transport=self.transport.name,
            worker_seconds={ids[i]: done_at[i] for i in range(len(workers))},
            pause_seconds={ids[i]: pauses[i] for i in range(len(workers))},
            refetches={ids[i]: failures[i] for i in range(len(workers)) if failures[i]},
        )

    def _outcome(self, ref: ray.ObjectRef, version: int) -> tuple[LoadReport | None, str | None]:
        """(the report, why the version is not served yet -- None when it is)."""
        try:
            report = ray.get(ref)
        except ray.exceptions.RayActorError:
            raise
        except Exception as error:  # a failed transfer: the transport's state may be broken
            self.transport.reset()
            return None, f"{type(error).__name__}: {error}"
        if report is None or report.served_version >= version:
            return report, None
        return report, report.refused or f"serves version {report.served_version}"

    def catch_up(self, worker) -> ray.ObjectRef | None:
        """Bring a new (or replacement) worker to the current version from the canonical
        object-store copy; returns the ack ref (resolving to the worker's LoadReport)."""
        if self._latest_ref is None:
            return None
        return deliver_from_object_store(self._latest_ref, worker)
