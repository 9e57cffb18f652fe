"""The durable stream of scored rollouts between the reward workers and the learner (Redis).

Each step's scored rollouts are appended as one entry as soon as they are scored, and
acknowledged (deleted) only once a checkpoint that includes their training is on disk. So after
the driver or the learner dies, the entries still in the stream are exactly the scored work the
resumed job has not trained yet: it trains them first, once, instead of generating them again.

Entries are JSON (never pickle: whoever can write to Redis must not be able to run code here).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import redis

from reward_workers.interface import ScoredRollout
from rollout_workers.interface import Rollout


def stream_key(job_id: str) -> str:
    return f"rft:job:{job_id}:scored"


class ScoredRolloutStream:
    def __init__(self, client: redis.Redis, job_id: str):
        self.redis = client
        self.key = stream_key(job_id)

    def append(self, step: int, scored: list[ScoredRollout]) -> None:
        """Record step `step`'s scored rollouts (step = the 0-based index of the step they feed)."""
        payload = json.dumps([asdict(s) for s in scored])
        self.redis.xadd(self.key, {"step": step, "scored": payload})

    def unacknowledged(self) -> dict[int, list[ScoredRollout]]:
        """Step index -> its scored rollouts, for every entry not yet acknowledged."""
        backlog = {}
        for _, fields in self.redis.xrange(self.key):
            scored = []
            for record in json.loads(fields[b"scored"]):
                rollout = Rollout(**record.pop("rollout"))
                scored.append(ScoredRollout(rollout=rollout, **record))
            backlog[int(fields[b"step"])] = scored
        return backlog

    def acknowledge(self, before_step: int) -> int:
        """Drop the entries of every step index below `before_step` (trained and checkpointed);
        returns how many entries were dropped."""
        done = [
            entry_id for entry_id, fields in self.redis.xrange(self.key) if int(fields[b"step"]) < before_step
        ]
        return self.redis.xdel(self.key, *done) if done else 0

    def clear(self) -> None:
        """A fresh (not resumed) run under this job id starts with an empty stream."""
        self.redis.delete(self.key)
