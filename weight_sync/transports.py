"""How a published version travels from the learner to the rollout workers.

A transport starts one delivery by calling named methods of the two ends
(`weight_sync/endpoints.py`): the learner's `WeightsSender` methods where it sends, and every
worker's `WeightsReceiver.receive_weights(source)`, which fetches the weights from `source`,
loads them and answers with a `LoadReport`. Three transports:

- `ObjectStoreTransport` (default, any machine): the learner's export is one Ray object; every
  worker receives `FromObjectStore(ref)` and Ray moves the tensors once per node.
- `BroadcastTransport`: a torch.distributed group (gloo on CPU, nccl on GPUs) of the learner
  (rank 0) and the workers (`weight_sync/broadcast.py`); the learner's `broadcast_weights` and
  the workers' `receive_weights(FromBroadcast())` are issued as concurrent actor calls, since a
  collective needs every rank in it.
- `FileTransport`: the learner's `write_weights_version` writes `<root>/v<version>/` atomically
  (a peft directory for an adapter) and answers the `FromDirectory` each worker then reads: for
  engines that only load weights from disk.

The object-store copy of a version is the canonical one: the channel re-fetches a refused
version, and catches up a worker that joins later, through it, whatever the transport.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Protocol

import ray

from .broadcast import GroupSpec
from .endpoints import FromBroadcast, FromObjectStore


@dataclass
class Delivery:
    acks: list  # one ObjectRef per worker, resolving to its LoadReport
    senders: list = field(default_factory=list)  # learner-side calls that must succeed too


class Transport(Protocol):
    name: str

    def deliver(self, weights_ref: ray.ObjectRef, version: int, workers: list) -> Delivery:
        """Start delivering `version` (whose canonical copy is `weights_ref`) to every worker."""
        ...

    def reset(self) -> None:
        """Forget per-delivery state a failure may have broken (e.g. a process group)."""
        ...


def deliver_from_object_store(weights_ref: ray.ObjectRef, worker) -> ray.ObjectRef:
    """One worker fetches the canonical copy: catch-up, re-fetch, and the object-store transport."""
    return worker.receive_weights.remote(FromObjectStore(weights_ref))


class ObjectStoreTransport:
    name = "object_store"

    def deliver(self, weights_ref, version, workers) -> Delivery:
        return Delivery([deliver_from_object_store(weights_ref, worker) for worker in workers])

    def reset(self) -> None:
        pass


class FileTransport:
    name = "file"

    def __init__(self, learner, root: str | None = None, keep_last: int = 2) -> None:
        self.learner, self.keep_last = learner, keep_last
        self.root = root or tempfile.mkdtemp(prefix="rft-weights-")

    def deliver(self, weights_ref, version, workers) -> Delivery:
        # The learner writes from its own copy; `written` resolves to the FromDirectory, and each
        # read, taking it as an argument, starts only once the directory has been renamed into place.
        written = self.learner.write_weights_version.remote(weights_ref, self.root, self.keep_last)
        return Delivery([w.receive_weights.remote(written) for w in workers])

    def reset(self) -> None:
        pass


class BroadcastTransport:
    """The group is formed at the first delivery and re-formed whenever the set of workers
    changes (a group's size is fixed) or a delivery failed; a worker added in between is caught
    up through the object store, so a joiner never holds a collective open mid-step."""

    name = "broadcast"

    def __init__(self, learner, bucket_bytes: int, timeout_s: float) -> None:
        self.learner, self.bucket_bytes, self.timeout_s = learner, bucket_bytes, timeout_s
        self.members: list | None = None  # the workers of the current formation, in rank order
        self.formations = 0

    def deliver(self, weights_ref, version, workers) -> Delivery:
        if self.members != list(workers):
            self._form(workers)
        sender = self.learner.broadcast_weights.remote(weights_ref, self.bucket_bytes)
        return Delivery([w.receive_weights.remote(FromBroadcast()) for w in workers], [sender])

    def _form(self, workers: list) -> None:
        self.members = None
        store = ray.get(self.learner.open_sync_store.remote(self.timeout_s))
        nodes = ray.get([w.sync_node_id.remote() for w in workers])
        self.formations += 1
        spec = GroupSpec(
            host="127.0.0.1" if all(n == store.node_id for n in nodes) else store.ip,
            port=store.port,
            world_size=1 + len(workers),
            backend=store.backend,
            timeout_s=self.timeout_s,
            name=f"rft-weight-sync-{self.formations}",
        )
        # Every rank must be in the rendezvous at once: all calls first, then wait.
        ray.get(
            [self.learner.join_sync_group.remote(spec, 0)]
            + [w.join_sync_group.remote(spec, rank) for rank, w in enumerate(workers, start=1)]
        )
        self.members = list(workers)

    def reset(self) -> None:
        self.members = None  # re-formed at the next delivery


def make_transport(
    name: str, learner, bucket_bytes: int, timeout_s: float, file_root: str | None
) -> Transport:
    if name == "object_store":
        return ObjectStoreTransport()
    if learner is None:
        raise ValueError(f"sync.transport={name} needs the learner actor (it sends from there)")
    if name == "broadcast":
        return BroadcastTransport(learner, bucket_bytes, timeout_s)
    if name == "file":
        return FileTransport(learner, file_root)
    raise ValueError(f"unknown sync.transport {name!r}: expected object_store, broadcast or file")
