"""The trusted side of session mode: SessionSandbox, one warm runner hosting many episodes
(episodes.py), safe to call from many threads at once.

Each call is a request with an id; one reader thread per runner hands each reply to the thread
waiting for it, so calls of different episodes run side by side, and a hung call costs its own
episode only (the runner kills it at its timeout). Nothing here raises for what the untrusted
code does: a child that dies, hangs or floods, and a runner that dies or stops answering, give
a SessionResult with the reason. A dead runner is replaced on the next open(); the episodes it
held report that they were lost.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from core.sandbox.namespaces import SandboxUnavailableError
from core.sandbox.redaction import known_secrets, redact_json
from core.sandbox.runner_process import (
    MAX_ERROR_CHARS,
    RUNNER_GRACE_S,
    Isolation,
    RunnerFailure,
    RunnerProcess,
    TargetLoadError,
)
from core.sandbox.target import SandboxLimits, SandboxTarget


@dataclass
class SessionResult:
    value: Any = None  # what the call returned (JSON), secrets redacted
    error: str | None = None  # why it failed
    ended: bool = False  # the episode is gone (its process ended, or the runner): no more calls


@dataclass(eq=False)
class SessionEpisode:
    """An open episode: its number in the runner that holds it."""

    number: int
    connection: _Connection = field(repr=False)


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict = field(default_factory=dict)


class _Connection:
    """One runner process in session mode, the thread reading its replies, the calls waiting."""

    def __init__(self, process: RunnerProcess):
        self.process = process
        self._lock = threading.Lock()  # sending, and the table of waiters
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._stopping: str | None = None  # why we killed the runner, when we did
        self.lost: str | None = None  # why the runner is gone, once it is
        self._reader = threading.Thread(target=self._read, name=f"sandbox-runner-{process.pid}", daemon=True)
        self._reader.start()

    def request(self, message: dict, wait_s: float) -> dict:
        """Send one request and wait for its reply (or for the runner to be gone)."""
        waiter = _Waiter()
        with self._lock:
            if self.lost:
                return {"error": self.lost, "ended": True}
            request_id = next(self._ids)
            self._waiters[request_id] = waiter
            try:
                self.process.send({**message, "id": request_id})
            except OSError:  # it died; the reader sees that and answers every waiter
                pass
        if not waiter.done.wait(wait_s):
            self.stop(f"did not answer within {wait_s:g} s")
            waiter.done.wait()
        return waiter.reply

    def stop(self, reason: str) -> None:
        """Kill the runner (from any thread); the reader then fails every waiting call."""
        self._stopping = self._stopping or reason
        self.process.kill()

    def join(self) -> None:
        self._reader.join()

    def _read(self) -> None:
        while True:
            try:
                reply = self.process.read_reply(None)
            except RunnerFailure as e:
                reason = self._stopping or str(e)
                break
            with self._lock:
                waiter = self._waiters.pop(reply.get("id"), None)
            if waiter is not None:
                waiter.reply = reply
                waiter.done.set()
        with self._lock:
            self.lost = f"sandbox runner {reason}"
            waiters, self._waiters = self._waiters, {}
        self.process.stop()
        for waiter in waiters.values():
            waiter.reply = {"error": f"{self.lost} during the call", "ended": True}
            waiter.done.set()


class SessionSandbox:
    """A sandbox for `target` in session mode. Thread-safe; use as a context manager.

    The target's factory returns `start(item) -> (session, initial value)`, optionally with a
    `describe()` whose value is `description`; call(episode, method, payload) runs
    `session.<method>(payload)` in the episode's own child."""

    def __init__(self, target: SandboxTarget, limits: SandboxLimits, secrets: tuple[str, ...] = ()):
        """`secrets`: values to redact from results besides those known_secrets() finds."""
        self._target, self._limits, self._secrets = target, limits, tuple(secrets)
        self._isolation = Isolation.decide(limits, target.role)
        self._lock = threading.Lock()  # starting a runner
        self._connection: _Connection | None = None
        self._closed = False
        self.load_error: str | None = None  # the target would not load: every open fails with it
        self.protections: list[str] = []  # what the running sandbox enforces, as reported by it
        self.description: Any = None  # what the target's describe() returned
        self.secrets_redacted = 0  # secrets cut out of results so far
        self._count_lock = threading.Lock()
        try:
            self._connect()  # a sandbox that cannot be set up raises here, not at the first open
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SessionSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def runner_pid(self) -> int | None:
        """The runner's process (its group holds the whole sandbox); None while none runs."""
        connection = self._connection
        return connection.process.pid if connection and not connection.lost else None

    def open(self, item: dict, timeout_s: float | None = None) -> tuple[SessionEpisode | None, SessionResult]:
        """Start an episode for `item`: (the episode, start's initial value), or (None, the error)."""
        connection, problem = self._connect()
        if connection is None:
            return None, SessionResult(error=problem, ended=True)
        timeout_s = timeout_s or self._limits.timeout_s
        message = {"op": "open", "item": item, "timeout_s": timeout_s}
        reply = connection.request(message, timeout_s + RUNNER_GRACE_S)
        result = self._result(reply)
        if result.error is not None or "episode" not in reply:
            return None, SessionResult(error=result.error or "the runner sent no episode", ended=True)
        return SessionEpisode(reply["episode"], connection), result

    def call(
        self, episode: SessionEpisode, method: str, payload: Any, timeout_s: float | None = None
    ) -> SessionResult:
        """`session.<method>(payload)` in the episode's child, within `timeout_s` (wall clock)."""
        timeout_s = timeout_s or self._limits.timeout_s
        message = {"op": "call", "episode": episode.number, "method": method, "payload": payload}
        reply = episode.connection.request({**message, "timeout_s": timeout_s}, timeout_s + RUNNER_GRACE_S)
        return self._result(reply)

    def close(self, episode: SessionEpisode | None = None) -> None:
        """Close one episode (its processes killed, its files removed), or, without one, the
        sandbox: every episode and the runner."""
        if episode is not None:
            if not episode.connection.lost:
                episode.connection.request({"op": "close", "episode": episode.number}, RUNNER_GRACE_S)
            return
        with self._lock:
            self._closed, connection, self._connection = True, self._connection, None
        if connection is not None:
            connection.stop("was closed")
            connection.join()
        self._isolation.clean_up()

    def _connect(self) -> tuple[_Connection | None, str | None]:
        """(the live runner, started anew if there is none or it died, or None and why not).
        The first start's failures stand (the target does not load, or the sandbox cannot be
        set up: raised); a replacement's cost only the open that asked for it."""
        with self._lock:
            if self._closed or self.load_error is not None:
                return None, self.load_error or "the sandbox is closed"
            if self._connection is None or self._connection.lost:
                first = self._connection is None
                process = RunnerProcess(self._target, self._limits, "session", self._isolation, self._secrets)
                try:
                    loaded = process.start()
                except (TargetLoadError, SandboxUnavailableError, OSError) as e:
                    if first and not isinstance(e, TargetLoadError):
                        raise
                    reason = self._redacted(str(e))[:MAX_ERROR_CHARS]
                    if first:
                        self.load_error = reason
                    return None, reason
                self.protections = list(loaded.get("protections", []))
                self.description = self._redacted(loaded.get("description"))
                self._connection = _Connection(process)
            return self._connection, None

    def _result(self, reply: dict) -> SessionResult:
        if "error" in reply:
            error = self._redacted(str(reply["error"]))[:MAX_ERROR_CHARS]
            return SessionResult(error=error, ended=bool(reply.get("ended")))
        return SessionResult(value=self._redacted(reply.get("value")))

    def _redacted(self, value):
        value, count = redact_json(value, known_secrets(self._secrets))  # per call: a token may appear
        if count:
            with self._count_lock:
                self.secrets_redacted += count
        return value
