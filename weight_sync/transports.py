"""How a published version travels from the learner to the rollout workers.

A transport starts one delivery: every worker fetches the weights its own way and loads them
(`apply_weights`, run inside the worker through `RolloutWorker.run_weight_sync`), answering with
a `LoadReport`. Three transports:

- `ObjectStoreTransport` (default, any machine): the learner's export is one Ray object; every
  worker gets the same reference and Ray moves the tensors once per node.
- `BroadcastTransport`: a torch.distributed group (gloo on CPU, nccl on GPUs) of the learner
  (rank 0) and the workers (`weight_sync/broadcast.py`); the learner's send and the workers'
  receives are issued as concurrent actor calls, since a collective needs every rank in it.
- `FileTransport`: the learner writes `<root>/v<version>/` atomically (a peft directory for an
  adapter), each worker reads it: for engines that only load weights from disk.

The object-store copy of a version is the canonical one: the channel re-fetches a refused
version, and catches up a worker that joins later, through it, whatever the transport.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import ray

from . import broadcast
from .adapter import WeightsRefused
from .files import read_version, write_version

# A worker-side fetch: (worker, *args) -> AdapterWeights | FullWeights, run inside the worker.
Fetch = Callable[..., Any]


@dataclass
class LoadReport:
    """A worker's answer to one delivery."""
    worker_id: str
    served_version: int  # after the call
    # The call (fetch + checks + load), less its wait for the requests running at the time to
    # finish (they go on generating meanwhile): the time the worker could not generate.
    seconds: float
    load_seconds: float = 0.0  # the engine's load alone
    refused: str | None = None  # why the worker refused the weights (corrupt, stale, wrong shape)


def apply_weights(worker, fetch: Fetch, *args) -> LoadReport:
    """Inside a worker: fetch the weights and load them. A refusal is an answer, not an error;
    anything else (a failed transfer) raises."""
    started = time.perf_counter()
    try:
        worker.load_weights(fetch(worker, *args))
    except WeightsRefused as refusal:
        return LoadReport(worker.worker_id, worker.version, time.perf_counter() - started,
                          refused=f"{type(refusal).__name__}: {refusal}")
    paused = time.perf_counter() - started - worker.drain_seconds
    return LoadReport(worker.worker_id, worker.version, paused, worker.load_seconds)


def from_object_store(_worker, boxed_ref: list) -> Any:
    """The ref travels boxed, so its transfer happens (and is timed) inside the call."""
    return ray.get(boxed_ref[0])


def from_directory(_worker, directory: str) -> Any:
    return read_version(directory)


@dataclass
class Delivery:
    acks: list  # one ObjectRef per worker, resolving to its LoadReport
    senders: list = field(default_factory=list)  # learner-side calls that must succeed too


class Transport(Protocol):
    name: str
    fetch: Fetch  # the worker-side fetch of a first delivery (the hook fault-injection tests wrap)

    def deliver(self, weights_ref: ray.ObjectRef, version: int, workers: list) -> Delivery:
        """Start delivering `version` (whose canonical copy is `weights_ref`) to every worker."""
        ...

    def reset(self) -> None:
        """Forget per-delivery state a failure may have broken (e.g. a process group)."""
        ...


def deliver_from_object_store(weights_ref: ray.ObjectRef, worker, fetch: Fetch = from_object_store) -> ray.ObjectRef:
    """One worker fetches the canonical copy: catch-up, re-fetch, and the object-store transport."""
    return worker.run_weight_sync.remote(apply_weights, fetch, [weights_ref])


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self) -> None:
        self.fetch: Fetch = from_object_store

    def deliver(self, weights_ref, version, workers) -> Delivery:
        return Delivery([deliver_from_object_store(weights_ref, worker, self.fetch) for worker in workers])

    def reset(self) -> None:
        pass


class FileTransport:
    name = "file"

    def __init__(self, learner, root: str | None = None, keep_last: int = 2) -> None:
        self.learner, self.keep_last = learner, keep_last
        self.root = root or tempfile.mkdtemp(prefix="rft-weights-")
        self.fetch: Fetch = from_directory

    def deliver(self, weights_ref, version, workers) -> Delivery:
        # The learner writes from its own copy; each read waits on the write's ref, so it starts
        # only once the directory has been renamed into place.
        written = self.learner.run_weight_sync.remote(_write, weights_ref, self.root, self.keep_last)
        return Delivery([w.run_weight_sync.remote(apply_weights, self.fetch, written) for w in workers])

    def reset(self) -> None:
        pass


def _write(_learner, weights, root: str, keep_last: int) -> str:
    return str(write_version(weights, root, keep_last))


class BroadcastTransport:
    """The group is formed at the first delivery and re-formed whenever the set of workers
    changes (a group's size is fixed) or a delivery failed; a worker added in between is caught
    up through the object store, so a joiner never holds a collective open mid-step."""
    name = "broadcast"

    def __init__(self, learner, bucket_bytes: int, timeout_s: float) -> None:
        self.learner, self.bucket_bytes, self.timeout_s = learner, bucket_bytes, timeout_s
        self.fetch: Fetch = broadcast.receive_weights
        self.members: list | None = None  # the workers of the current formation, in rank order
        self.formations = 0

    def deliver(self, weights_ref, version, workers) -> Delivery:
        if self.members != list(workers):
            self._form(workers)
        sender = self.learner.run_weight_sync.remote(broadcast.send_weights, weights_ref, self.bucket_bytes)
        return Delivery([w.run_weight_sync.remote(apply_weights, self.fetch) for w in workers], [sender])

    def _form(self, workers: list) -> None:
        self.members = None
        host_ip, port, learner_node, backend = ray.get(
            self.learner.run_weight_sync.remote(broadcast.open_store, self.timeout_s))
        nodes = ray.get([w.run_weight_sync.remote(broadcast.node_id) for w in workers])
        self.formations += 1
        spec = broadcast.GroupSpec(
            host="127.0.0.1" if all(n == learner_node for n in nodes) else host_ip, port=port,
            world_size=1 + len(workers), backend=backend, timeout_s=self.timeout_s,
            name=f"rft-weight-sync-{self.formations}")
        # Every rank must be in the rendezvous at once: all calls first, then wait.
        ray.get([self.learner.run_weight_sync.remote(broadcast.join_group, spec, 0)]
                + [w.run_weight_sync.remote(broadcast.join_group, spec, rank)
                   for rank, w in enumerate(workers, start=1)])
        self.members = list(workers)

    def reset(self) -> None:
        self.members = None  # re-formed at the next delivery


def make_transport(name: str, learner, bucket_bytes: int, timeout_s: float, file_root: str | None) -> Transport:
    if name == "object_store":
        return ObjectStoreTransport()
    if learner is None:
        raise ValueError(f"sync.transport={name} needs the learner actor (it sends from there)")
    if name == "broadcast":
        return BroadcastTransport(learner, bucket_bytes, timeout_s)
    if name == "file":
        return FileTransport(learner, file_root)
    raise ValueError(f"unknown sync.transport {name!r}: expected object_store, broadcast or file")
