"""Hands generation requests to the rollout workers and gets every one of them back, once.

The driver submits a batch of requests under a tag (a step number, or "eval"); the scheduler
shares its prompt groups out over the live workers (least loaded first; a prompt's samples stay
on one worker) and opens one stream per worker. Workers generate continuously and stream each
group back the moment it is complete; `stream(tag)` yields them in the order they finish, so
scoring starts while the slowest samples are still generating. Each stream carries the policy
version current at submission as a floor: a worker generates it only once it serves that
version or newer.

Self-healing: the scheduler knows which groups of each stream have not come back yet. When a
worker dies, its streams fail (Ray raises RayActorError within moments of the process dying);
the scheduler starts a replacement, which loads the current weights first, and re-issues each
stream's missing groups on the least-busy live worker. A group is taken exactly once and only
missing groups are re-issued, so no request is lost or returned twice.

Scaling: `resize(n)` adds workers (each first catches up to the current policy version) or
retires the least-busy ones; a retired worker gets no new streams, finishes those it has, and is
then stopped.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import ray
from ray.exceptions import RayActorError

from rollout_workers.interface import GenerationRequest, Rollout, SamplingSettings

log = logging.getLogger("rft.rollouts")

PING_TIMEOUT_S = 30.0
MAX_SYNC_ATTEMPTS = 3  # workers dying during every one of these syncs is a real outage


@dataclass
class _Stream:
    tag: Hashable
    worker_id: str
    sampling: SamplingSettings
    min_version: int
    missing: dict[str, list[GenerationRequest]]  # prompt_id -> its group, until it comes back

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for group in self.missing.values() for request in group]


class RolloutScheduler:
    def __init__(
        self,
        start_worker: Callable[[], tuple[str, object]],
        channel,
        num_workers: int,
        on_worker_gone: Callable[[str], None] = lambda worker_id: None,
    ):
        """`start_worker()` creates one rollout-worker actor and returns (worker_id, handle);
        `channel` is the weight-sync channel (its `catch_up` syncs a new worker);
        `on_worker_gone(worker_id)` is told when a worker died or was retired."""
        self._start_worker = start_worker
        self._on_worker_gone = on_worker_gone
        self.channel = channel
        self.workers: dict[str, object] = {}  # live workers that get new streams
        self.retiring: dict[str, object] = {}  # removed by resize: finishing their streams
        self._streams: dict[ray.ObjectRefGenerator, _Stream] = {}
        self._arrived: dict[Hashable, list[list[Rollout]]] = defaultdict(list)  # groups not yet streamed
        self.ended_at: dict[Hashable, float] = {}  # tag -> when `stream(tag)` gave its last group
        self.workers_replaced = 0
        self.requests_reissued = 0
        for _ in range(num_workers):
            self._add_worker()

    # ------------------------------------------------------------ generation

    def submit(self, tag: Hashable, requests: list[GenerationRequest], sampling: SamplingSettings) -> None:
        """Start generating `requests`; `stream(tag)` or `collect(tag)` returns their rollouts."""
        groups: dict[str, list[GenerationRequest]] = defaultdict(list)
        for request in requests:
            groups[request.prompt_id].append(request)
        load = self._load()
        shares: dict[str, dict[str, list[GenerationRequest]]] = defaultdict(dict)
        for prompt_id, group in groups.items():
            worker_id = min(load, key=load.get)
            shares[worker_id][prompt_id] = group
            load[worker_id] += len(group)
        for worker_id, share in shares.items():
            self._open(_Stream(tag, worker_id, sampling, self.channel.version, share))

    def stream(self, tag: Hashable) -> Iterator[list[Rollout]]:
        """Each group of rollouts submitted under `tag`, as soon as it is complete (re-issuing
        the groups of workers that died). Groups of other tags that finish meanwhile are kept
        for their own stream. When the last group is out, `ended_at[tag]` says when."""
        yield from self._arrived.pop(tag, [])
        while any(stream.tag == tag for stream in self._streams.values()):
            [generator], _ = ray.wait(list(self._streams), num_returns=1)
            stream = self._streams[generator]
            group = self._take(generator)
            if group is None:
                continue
            if stream.tag == tag:
                yield group
            else:
                self._arrived[stream.tag].append(group)
        self.ended_at[tag] = time.perf_counter()

    def collect(self, tag: Hashable) -> list[Rollout]:
        """Every rollout submitted under `tag`, once all are done."""
        return [rollout for group in self.stream(tag) for rollout in group]

    def _open(self, stream: _Stream) -> None:
        generator = (
            self.workers[stream.worker_id]
            .generate_stream.options(num_returns="streaming")
            .remote(stream.requests, stream.sampling, stream.min_version)
        )
        self._streams[generator] = stream

    def _take(self, generator: ray.ObjectRefGenerator) -> list[Rollout] | None:
        """The stream's next group; None when the stream ended or its worker died."""
        stream = self._streams[generator]
        try:
            group = ray.get(next(generator))
        except StopIteration:  # the stream ended: not an error of its own
            del self._streams[generator]
            if stream.missing:  # a worker must not end a stream early; nothing may go missing
                raise RuntimeError(
                    f"rollout worker {stream.worker_id} ended a stream without "
                    f"the groups of {sorted(stream.missing)}"
                ) from None
            self._stop_retired()
            return None
        except RayActorError as error:
            del self._streams[generator]
            self._worker_died(stream.worker_id, error)
            if stream.missing:
                stream.worker_id = self._least_busy()
                self.requests_reissued += len(stream.requests)
                self._open(stream)
            self._stop_retired()
            return None
        del stream.missing[group[0].prompt_id]
        return group

    def _load(self) -> dict[str, int]:
        """Live worker id -> samples it has not returned yet."""
        load = {worker_id: 0 for worker_id in self.workers}
        for stream in self._streams.values():
            if stream.worker_id in load:
                load[stream.worker_id] += len(stream.requests)
        return load

    def _least_busy(self) -> str:
        load = self._load()
        return min(load, key=load.get)

    # ------------------------------------------------------------ membership

    def _add_worker(self) -> str:
        worker_id, handle = self._start_worker()
        # Streams opened on it carry the current version as their floor: they wait for this load.
        self.channel.catch_up(handle)
        self.workers[worker_id] = handle
        return worker_id

    def _worker_died(self, worker_id: str, error: Exception) -> None:
        if self.retiring.pop(worker_id, None) is not None:
            self._on_worker_gone(worker_id)  # a retiring worker needs no replacement
            return
        if worker_id not in self.workers:
            return  # its death is already handled
        del self.workers[worker_id]
        self._on_worker_gone(worker_id)
        replacement = self._add_worker()
        self.workers_replaced += 1
        log.warning(
            "rollout worker %s died (%s); replaced by %s", worker_id, type(error).__name__, replacement
        )

    def resize(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"a job needs at least one rollout worker, asked for {num_workers}")
        added = [self._add_worker() for _ in range(num_workers - len(self.workers))]
        while len(self.workers) > num_workers:
            worker_id = self._least_busy()
            self.retiring[worker_id] = self.workers.pop(worker_id)
        if added or self.retiring:
            log.info(
                "rollout workers: %d (added %s, retiring %s)", len(self.workers), added, list(self.retiring)
            )
        self._stop_retired()

    def _stop_retired(self) -> None:
        busy = {stream.worker_id for stream in self._streams.values()}
        for worker_id in [w for w in self.retiring if w not in busy]:
            ray.kill(self.retiring.pop(worker_id))
            self._on_worker_gone(worker_id)

    def replace_dead_workers(self) -> list[str]:
        """Ping every live worker; replace those that are gone. Returns the dead workers' ids."""
        dead = []
        for worker_id, handle in list(self.workers.items()):
            try:
                ray.get(handle.ping.remote(), timeout=PING_TIMEOUT_S)
            except RayActorError as error:
                dead.append(worker_id)
                self._worker_died(worker_id, error)
        return dead

    def publish(self, version: int, weights_ref: ray.ObjectRef):
        """Sync every live worker to `version` over the channel. A worker that dies meanwhile is
        replaced (the replacement catches up first) and the sync is retried; workers that
        already loaded `version` take the retry as a no-op."""
        for _ in range(MAX_SYNC_ATTEMPTS - 1):
            try:
                return self.channel.publish(version, weights_ref, list(self.workers.values()))
            except RayActorError:
                self.replace_dead_workers()
        return self.channel.publish(version, weights_ref, list(self.workers.values()))

    def shutdown(self) -> None:
        for handle in [*self.workers.values(), *self.retiring.values()]:
            ray.kill(handle)
        self.workers.clear()
        self.retiring.clear()
