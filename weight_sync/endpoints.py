"""The two ends of a weight sync: the methods a transport calls on the learner and on each worker.

A transport (`weight_sync/transports.py`) never runs code of its own inside an actor: it calls
named methods of these two mixins, which the actors inherit (as vLLM declares a
`worker_extension_cls`), so what an actor offers a sync can be listed:

- `WeightsSender`, mixed into the learner: `open_sync_store`, `join_sync_group`,
  `broadcast_weights`, `write_weights_version`.
- `WeightsReceiver`, mixed into each rollout worker: `sync_node_id`, `join_sync_group`,
  `receive_weights`, `served_weights`. It fetches the weights from the `WeightsSource` it is
  given, loads them with the worker's own `load_weights`, and answers with a `LoadReport`.

Neither defines `__init__`: the state a broadcast group needs (this process's member, the
learner's TCP store) starts as a class-level `None` and becomes an instance attribute when set,
so the mixins work the same in a Ray actor and in a plain instance. Their names must not clash
with the actor's own (a test checks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, Protocol, Union

import ray
import torch
import torch.distributed as dist

from .adapter import AdapterWeights, WeightsRefused
from .broadcast import BroadcastMember, GroupSpec
from .files import read_version, write_version
from .full_weights import FullWeights

Weights = Union[AdapterWeights, FullWeights]


# ---- where a receiver gets the weights from --------------------------------------------------


@dataclass(frozen=True)
class FromObjectStore:
    """The canonical Ray object. The ref travels inside this box, so Ray does not resolve it
    before the call: the transfer happens (and is timed) inside `receive_weights`."""

    ref: ray.ObjectRef


@dataclass(frozen=True)
class FromDirectory:
    """A version directory written by `WeightsSender.write_weights_version` (`weight_sync/files.py`)."""

    directory: str


@dataclass(frozen=True)
class FromBroadcast:
    """The broadcast group this worker joined last: rank 0 sends concurrently (`broadcast_weights`)."""


WeightsSource = Union[FromObjectStore, FromDirectory, FromBroadcast]


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


class SyncStore(NamedTuple):
    """Where the learner's TCP store for a new broadcast formation listens."""

    ip: str  # this node's IP
    port: int
    node_id: str  # this node's Ray id: members on the same node connect over loopback
    backend: str  # "nccl" with a GPU, else "gloo"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _no_group() -> RuntimeError:
    return RuntimeError("not a member of a weight-sync broadcast group (the channel forms it before a sync)")


# ---- the learner's side ----------------------------------------------------------------------


class WeightsSender:
    """Mixed into the learner; relies on nothing of the learner's own. Methods:

    - `open_sync_store(timeout_s) -> SyncStore`: leave any previous group, host a fresh TCP store.
    - `join_sync_group(spec, rank=0)`: join that formation as rank 0 (blocks until all joined).
    - `broadcast_weights(weights, bucket_bytes)`: send one version to the group.
    - `write_weights_version(weights, root, keep_last) -> FromDirectory`: write `<root>/v<version>/`
      atomically; the answer is where receivers read it (a transport passes its ref on as is).
    """

    _sync_member: BroadcastMember | None = None
    _sync_master_store: dist.TCPStore | None = None

    def open_sync_store(self, timeout_s: float) -> SyncStore:
        """Host a fresh TCP store on a port the OS picks (no race for a 'free' port)."""
        self._sync_member = self._sync_master_store = None
        store = dist.TCPStore(
            "0.0.0.0", 0, None, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self._sync_master_store = store
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return SyncStore(ray.util.get_node_ip_address(), store.port, _node_id(), backend)

    def join_sync_group(self, spec: GroupSpec, rank: int = 0) -> None:
        """Join the formation `spec` over the store `open_sync_store` opened; blocks until every
        member has joined."""
        master_store, self._sync_master_store = self._sync_master_store, None
        self._sync_member = BroadcastMember(spec, rank, master_store)

    def broadcast_weights(self, weights: Weights, bucket_bytes: int) -> None:
        """Rank 0: broadcast `weights` (every worker must be in `receive_weights` concurrently)."""
        if self._sync_member is None:
            raise _no_group()
        self._sync_member.send(weights, bucket_bytes)

    def write_weights_version(self, weights: Weights, root: str, keep_last: int) -> FromDirectory:
        return FromDirectory(str(write_version(weights, root, keep_last)))


# ---- each rollout worker's side --------------------------------------------------------------


class ReceiverActor(Protocol):
    """What `WeightsReceiver` uses of the actor it is mixed into."""

    worker_id: str
    version: int  # the policy version served
    sha256: str  # the served weights' checksum
    drain_seconds: float  # how long the last `load_weights` waited for running requests
    load_seconds: float  # the engine's last load

    def load_weights(self, weights: Weights) -> int:
        """Serve `weights`; returns the version served. Raises a `WeightsRefused` on refusal,
        keeping the current weights."""
        ...


class WeightsReceiver:
    """Mixed into a rollout worker, which provides what `ReceiverActor` lists (`worker_id`,
    `version`, `sha256`, `drain_seconds`, `load_seconds`, `load_weights`). Methods:

    - `sync_node_id() -> str`: this process's Ray node (the group's host is chosen from these).
    - `join_sync_group(spec, rank)`: leave any previous group and join this formation.
    - `receive_weights(source) -> LoadReport`: fetch the weights from `source`, load them.
    - `served_weights() -> (version, sha256)`: what the worker serves now.
    """

    _sync_member: BroadcastMember | None = None

    def sync_node_id(self) -> str:
        return _node_id()

    def join_sync_group(self, spec: GroupSpec, rank: int) -> None:
        """Blocks until every member (the learner as rank 0 too) has joined."""
        self._sync_member = None
        self._sync_member = BroadcastMember(spec, rank)

    def receive_weights(self, source: WeightsSource) -> LoadReport:
        """Fetch and load the weights. A refusal (corrupt, not newer, wrong shape) is an answer,
        not an error; anything else (a failed transfer) raises."""
        started = time.perf_counter()
        try:
            self.load_weights(self._fetch_weights(source))
        except WeightsRefused as refusal:
            return LoadReport(
                self.worker_id,
                self.version,
                time.perf_counter() - started,
                refused=f"{type(refusal).__name__}: {refusal}",
            )
        paused = time.perf_counter() - started - self.drain_seconds
        return LoadReport(self.worker_id, self.version, paused, self.load_seconds)

    def served_weights(self) -> tuple[int, str]:
        return self.version, self.sha256

    def _fetch_weights(self, source: WeightsSource) -> Weights:
        """The transfer alone: the weights as they arrived, unverified (the engine verifies them)."""
        if isinstance(source, FromObjectStore):
            return ray.get(source.ref)
        if isinstance(source, FromDirectory):
            return read_version(source.directory)
        if isinstance(source, FromBroadcast):
            if self._sync_member is None:
                raise _no_group()
            return self._sync_member.receive()
        raise TypeError(f"not a weights source: {source!r}")
