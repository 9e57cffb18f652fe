"""How many threads the learner's forward/backward passes use: fixed, or following the cores the
other processes on this node leave free (`learner.threads: follow_free`).

On a small box the learner and the rollout workers share the cores, each with a fixed share
(`services/orchestrator/setup.py::actor_env`). But they are not always busy at the same time: a
rollout worker that has generated everything it may (the staleness bound) waits for the next
policy version while the learner computes, and then its cores are idle. Between micro-batches
the governor measures how busy the *other* processes were since its last look (the node's busy
CPU time minus this process's, over the wall time) and sets torch's intra-op threads to the
cores they left free, never fewer than the fixed share. When the rollout worker wakes up, the
next look sees it and gives its cores back: the cost of a wrong guess is bounded by one
micro-batch of oversubscription.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil
import torch

MIN_INTERVAL_S = 0.2  # shorter windows measure scheduling noise, not load
# A core counts as free when the others used less than this much of it: a rollout worker waiting
# for weights still wakes now and then (heartbeats, metrics), which must not hide an idle core.
FREE_CORE_SLACK = 0.25


def busy_seconds(times) -> float:
    """CPU seconds spent not idle, from a psutil cpu_times tuple (node-wide, all cores)."""
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Sample:
    wall: float
    node_busy: float
    own_busy: float


class ThreadGovernor:
    """`adjust()` between micro-batches; `threads` is what torch uses now."""

    def __init__(self, mode: str, base_threads: int | None = None, cores: int | None = None):
        self.mode = mode
        self.cores = cores or usable_cores()
        self.base_threads = max(1, min(base_threads or torch.get_num_threads(), self.cores))
        self.process = psutil.Process()
        self.threads = self.base_threads
        self.thread_seconds = 0.0  # threads x wall seconds at each count, for the mean
        self.wall_seconds = 0.0
        torch.set_num_threads(self.threads)
        self.last = self._sample()

    def _sample(self) -> Sample:
        own = self.process.cpu_times()
        return Sample(time.monotonic(), busy_seconds(psutil.cpu_times()), own.user + own.system)

    def adjust(self) -> int:
        """Measure the others' load since the last call and set the thread count; returns it."""
        if self.mode != "follow_free":
            return self.threads
        now = self._sample()
        wall = now.wall - self.last.wall
        if wall < MIN_INTERVAL_S:
            return self.threads
        others_busy = max(0.0, (now.node_busy - self.last.node_busy) - (now.own_busy - self.last.own_busy))
        free = self.cores - others_busy / wall
        self.thread_seconds += self.threads * wall
        self.wall_seconds += wall
        self.last = now
        wanted = max(self.base_threads, min(self.cores, int(free + FREE_CORE_SLACK)))
        if wanted != self.threads:
            torch.set_num_threads(wanted)
            self.threads = wanted
        return self.threads

    def mean_threads(self) -> float:
        """Time-weighted mean thread count since the last call of this (a step's metric)."""
        mean = self.thread_seconds / self.wall_seconds if self.wall_seconds else float(self.threads)
        self.thread_seconds = self.wall_seconds = 0.0
        return mean
