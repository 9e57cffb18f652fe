"""Hands generation requests to the rollout workers and gets every one of them back, once.

The driver submits a batch of requests under a tag (a step number, or "eval"); the scheduler
splits it into calls over the live workers, keeping each prompt's samples on one worker, and
tracks every call until its rollouts are back. Calls finish in any order and are taken as they
finish (`ray.wait`), so one slow worker does not hold up the others' results.

Self-healing: when a worker dies, each of its calls fails on its own (Ray raises
RayActorError for it within moments of the process dying); the scheduler starts a replacement,
which loads the current adapter before anything else (calls on an actor run in submission
order), and re-issues each failed call on the least-busy live worker. A call's result is taken
exactly once and a failed call is re-issued exactly once per failure, so no request is lost or
returned twice.

Scaling: `resize(n)` adds workers (each first catches up to the current policy version) or
retires the least-busy ones; a retired worker gets no new calls, finishes those it has, and is
then stopped.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable

import ray
from ray.exceptions import RayActorError

from rollout_workers.interface import GenerationRequest, Rollout, SamplingSettings

log = logging.getLogger("rft.rollouts")

PING_TIMEOUT_S = 30.0
MAX_SYNC_ATTEMPTS = 3  # workers dying during every one of these syncs is a real outage


@dataclass
class _Call:
    tag: Hashable
    worker_id: str
    requests: list[GenerationRequest]
    sampling: SamplingSettings


class RolloutScheduler:
    def __init__(self, start_worker: Callable[[], tuple[str, object]], channel, num_workers: int,
                 on_worker_gone: Callable[[str], None] = lambda worker_id: None):
        """`start_worker()` creates one rollout-worker actor and returns (worker_id, handle);
        `channel` is the weight-sync channel (its `catch_up` syncs a new worker);
        `on_worker_gone(worker_id)` is told when a worker died or was retired."""
        self._start_worker = start_worker
        self._on_worker_gone = on_worker_gone
        self.channel = channel
        self.workers: dict[str, object] = {}  # live workers that get new calls
        self.retiring: dict[str, object] = {}  # removed by resize: finishing their calls
        self._calls: dict[ray.ObjectRef, _Call] = {}
        self._results: dict[Hashable, list[Rollout]] = defaultdict(list)
        self.workers_replaced = 0
        self.requests_reissued = 0
        for _ in range(num_workers):
            self._add_worker()

    # ------------------------------------------------------------ generation

    def submit(self, tag: Hashable, requests: list[GenerationRequest], sampling: SamplingSettings) -> None:
        """Start generating `requests`; `collect(tag)` returns their rollouts."""
        groups: dict[str, list[GenerationRequest]] = defaultdict(list)
        for request in requests:
            groups[request.prompt_id].append(request)
        ordered_groups = list(groups.values())
        worker_ids = list(self.workers)
        for position, worker_id in enumerate(worker_ids):
            share = [r for group in ordered_groups[position::len(worker_ids)] for r in group]
            if share:
                self._issue(_Call(tag, worker_id, share, sampling))

    def collect(self, tag: Hashable) -> list[Rollout]:
        """Wait for every call under `tag` (re-issuing those whose worker died) and return their
        rollouts. Calls under other tags that finish meanwhile are kept for their own collect."""
        while any(call.tag == tag for call in self._calls.values()):
            ready, _ = ray.wait(list(self._calls), num_returns=1)
            self._take(ready[0])
        return self._results.pop(tag, [])

    def _issue(self, call: _Call) -> None:
        ref = self.workers[call.worker_id].generate.remote(call.requests, call.sampling)
        self._calls[ref] = call

    def _take(self, ref: ray.ObjectRef) -> None:
        call = self._calls.pop(ref)
        try:
            self._results[call.tag] += ray.get(ref)
        except RayActorError as error:
            self._worker_died(call.worker_id, error)
            call.worker_id = self._least_busy()
            self.requests_reissued += len(call.requests)
            self._issue(call)
        self._stop_retired()

    def _least_busy(self) -> str:
        load = {worker_id: 0 for worker_id in self.workers}
        for call in self._calls.values():
            if call.worker_id in load:
                load[call.worker_id] += len(call.requests)
        return min(load, key=load.get)

    # ------------------------------------------------------------ membership

    def _add_worker(self) -> str:
        worker_id, handle = self._start_worker()
        self.channel.catch_up(handle)  # queued ahead of any generate call on this worker
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
        log.warning("rollout worker %s died (%s); replaced by %s", worker_id, type(error).__name__, replacement)

    def resize(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"a job needs at least one rollout worker, asked for {num_workers}")
        added = [self._add_worker() for _ in range(num_workers - len(self.workers))]
        while len(self.workers) > num_workers:
            worker_id = self._least_busy()
            self.retiring[worker_id] = self.workers.pop(worker_id)
        if added or self.retiring:
            log.info("rollout workers: %d (added %s, retiring %s)", len(self.workers), added, list(self.retiring))
        self._stop_retired()

    def _stop_retired(self) -> None:
        busy = {call.worker_id for call in self._calls.values()}
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

    def publish(self, version: int, adapter_ref: ray.ObjectRef):
        """Sync every live worker to `version` over the channel. A worker that dies meanwhile is
        replaced (the replacement catches up first) and the sync is retried; workers that
        already loaded `version` take the retry as a no-op."""
        for _ in range(MAX_SYNC_ATTEMPTS - 1):
            try:
                return self.channel.publish(version, adapter_ref, list(self.workers.values()))
            except RayActorError:
                self.replace_dead_workers()
        return self.channel.publish(version, adapter_ref, list(self.workers.values()))

    def shutdown(self) -> None:
        for handle in [*self.workers.values(), *self.retiring.values()]:
            ray.kill(handle)
        self.workers.clear()
        self.retiring.clear()
