"""Session mode of the sandbox runner: it hosts episodes, one forked child per episode that keeps
the target's session object alive between calls.

The target (what the factory built) is `start(item) -> (session, initial value)`; a call runs
`session.<method>(payload)` in that episode's child. Protocol after the load reply (runner.py),
JSON lines; every request has an `id` that its reply repeats:
  parent -> {"id", "op": "open", "item", "timeout_s"}   runner -> {"id", "episode": n, "value"}
  parent -> {"id", "op": "call", "episode": n, "method", "payload", "timeout_s"}
                                                       runner -> {"id", "value"}
  parent -> {"id", "op": "close", "episode": n}         runner -> {"id", "value": null}
  any failure: runner -> {"id", "error": "...", "ended": bool}  (ended: the episode is gone)
Replies come as calls finish, not in the order asked: a hung call holds up only its own episode
(the runner never blocks on a child), until its timeout kills that episode. Per episode: CPU
seconds (the child's whole life), processes it may add, memory and file size (inherited from the
runner), output and reply size (per call), its own working directory (cwd and TMPDIR).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from core.sandbox.children import confine, describe_exit, encode_reply, failure, write_all
from core.sandbox.processes import kill_trees, orphans, parent_pids
from core.sandbox.root import check, libc

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 65536


def _episode_main(start, item, limits: dict, role: str, workdir: str, fds: tuple[int, int, int], nproc: int):
    """The episode's child: build the session, then answer one request line at a time. Never
    returns into the runner's loop."""
    request_fd, reply_fd, output_fd = fds
    pid = os.getpid()
    try:
        try:
            confine(limits, workdir, output_fd, keep=(request_fd, reply_fd), max_processes=nproc)
            check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")  # processes.py
            session, initial = start(item)
            payload = {"value": initial}
        except BaseException as e:  # noqa: BLE001 - the open fails with the reason
            write_all(reply_fd, encode_reply(failure(e, role, limits), role) + b"\n")
            return
        write_all(reply_fd, encode_reply(payload, role, ensure_ascii=False) + b"\n")
        for line in os.fdopen(request_fd, "rb"):
            request = json.loads(line)
            try:
                if request["method"].startswith("_"):
                    raise AttributeError(f"{request['method']!r} is private")
                payload = {"value": getattr(session, request["method"])(request["payload"])}
            except BaseException as e:  # noqa: BLE001 - reported; the episode goes on
                payload = failure(e, role, limits)
            if os.getpid() != pid:  # a process the session forked must not answer
                return
            write_all(reply_fd, encode_reply(payload, role, ensure_ascii=False) + b"\n")
    finally:
        os._exit(0)


@dataclass
class Episode:
    number: int
    pid: int
    exited_fd: int  # a pidfd: readable once the child has exited
    request_fd: int  # non-blocking: the runner never waits on a child
    reply_fd: int
    output_fd: int
    workdir: str
    outgoing: bytes = b""
    reply: bytes = b""
    call_id: int | None = None  # the request waiting for this episode's reply
    call_timeout_s: float = 0.0
    deadline: float = float("inf")
    output_bytes: int = 0
    wait_status: tuple[int, resource.struct_rusage] | None = None
    opened: bool = False  # start(item) has answered
    fds: list[int] = field(default_factory=list)


class EpisodeHost:
    """The runner's loop in session mode: requests from the parent, replies from the children."""

    def __init__(self, start, limits: dict, scratch: str, role: str, reply):
        self._start, self._limits, self._scratch, self._role = start, limits, scratch, role
        self._reply = reply  # writes one message to the parent
        self._episodes: dict[int, Episode] = {}
        self._ended: dict[int, str] = {}  # closed by a fault, not yet by the parent: why
        self._numbers = iter(range(1, 2**62))
        self._selector = selectors.DefaultSelector()

    def serve(self, requests_fd: int, pending: bytes = b"") -> None:
        """Until the parent closes our stdin."""
        # Orphans come to us even without a pid namespace, where they are killed (processes.py).
        check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        self._selector.register(requests_fd, selectors.EVENT_READ, None)
        buffer = pending
        try:
            while True:
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._handle(json.loads(line))
                timeout = min((e.deadline for e in self._episodes.values()), default=float("inf"))
                wait = None if timeout == float("inf") else max(0.0, timeout - time.monotonic())
                for key, events in self._selector.select(wait):
                    if key.data is None:
                        chunk = os.read(requests_fd, READ_CHUNK)
                        if not chunk:
                            return
                        buffer += chunk
                    else:
                        self._on_event(*key.data, events)
                self._reap()
                now = time.monotonic()
                for episode in [e for e in self._episodes.values() if e.deadline <= now]:
                    self._end(episode, f"timed out after {episode.call_timeout_s:g} s (wall-clock limit)")
        finally:
            for episode in list(self._episodes.values()):
                self._discard(episode)

    # -- requests from the parent ---------------------------------------------------------

    def _handle(self, request: dict) -> None:
        op, request_id = request["op"], request["id"]
        if op == "open":
            self._open(request_id, request["item"], request["timeout_s"])
            return
        number = request["episode"]
        episode = self._episodes.get(number)
        if op == "close":
            self._ended.pop(number, None)
            if episode is not None:
                if episode.call_id is not None:
                    self._send_error(episode.call_id, "the episode was closed during the call", ended=True)
                self._discard(episode)
            self._reply({"id": request_id, "value": None})
        elif episode is None:
            reason = self._ended.get(number, "it was never opened or is closed")
            self._send_error(request_id, f"episode {number} has ended: {reason}", ended=True)
        elif episode.call_id is not None:
            self._send_error(request_id, f"episode {number} is busy with another call", ended=False)
        else:
            message = {"method": request["method"], "payload": request["payload"]}
            self._begin_call(episode, request_id, request["timeout_s"])
            episode.outgoing += json.dumps(message, ensure_ascii=False).encode() + b"\n"
            self._watch(episode)

    def _open(self, request_id: int, item: dict, timeout_s: float) -> None:
        if len(self._episodes) >= self._limits["max_episodes"]:
            limit = self._limits["max_episodes"]
            self._send_error(request_id, f"too many episodes open at once (at most {limit})", ended=True)
            return
        fds: list[int] = []
        workdir = None
        try:
            workdir = tempfile.mkdtemp(dir=self._scratch)
            for _ in range(3):
                fds += os.pipe()
        except OSError as e:  # out of descriptors or of /tmp: this open fails, the others go on
            for fd in fds:
                os.close(fd)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            self._send_error(request_id, f"cannot start an episode: {e}", ended=True)
            return
        request_r, request_w, reply_r, reply_w, output_r, output_w = fds
        # RLIMIT_NPROC counts every process of the uid: in our pid namespace, all of the sandbox's.
        # (Without one, weak isolation, it counts the user's on the host, as in grade mode.)
        in_use = len(parent_pids()) if os.getpid() == 1 else 0
        nproc = in_use + self._limits["max_processes"]
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
            self._send_error(request_id, f"cannot start an episode: {e}", ended=True)
            return
        if pid == 0:
            _episode_main(
                self._start, item, self._limits, self._role, workdir, (request_r, reply_w, output_w), nproc
            )
        for fd in (request_r, reply_w, output_w):
            os.close(fd)
        os.set_blocking(request_w, False)
        episode = Episode(next(self._numbers), pid, os.pidfd_open(pid), request_w, reply_r, output_r, workdir)
        episode.fds = [episode.exited_fd, reply_r, output_r, request_w]
        self._episodes[episode.number] = episode
        for fd, kind in ((episode.exited_fd, "exited"), (reply_r, "reply"), (output_r, "output")):
            self._selector.register(fd, selectors.EVENT_READ, (episode, kind))
        self._begin_call(episode, request_id, timeout_s)

    def _begin_call(self, episode: Episode, request_id: int, timeout_s: float) -> None:
        episode.call_id, episode.call_timeout_s, episode.output_bytes = request_id, timeout_s, 0
        episode.deadline = time.monotonic() + timeout_s

    def _watch(self, episode: Episode) -> None:
        """Wait for room in the child's request pipe while there is something to send it."""
        data = (episode, "request")
        registered = self._selector.get_map().get(episode.request_fd) is not None
        if episode.outgoing and not registered:
            self._selector.register(episode.request_fd, selectors.EVENT_WRITE, data)
        elif not episode.outgoing and registered:
            self._selector.unregister(episode.request_fd)

    # -- events from the children -----------------------------------------------------------

    def _on_event(self, episode: Episode, kind: str, events: int) -> None:
        if self._episodes.get(episode.number) is not episode:
            return  # ended earlier in this round
        if kind == "request":
            try:
                sent = os.write(episode.request_fd, episode.outgoing)
            except BrokenPipeError:  # the child is gone; its exit is reported by the pidfd
                sent = len(episode.outgoing)
            episode.outgoing = episode.outgoing[sent:]
            self._watch(episode)
        elif kind == "output":
            chunk = os.read(episode.output_fd, READ_CHUNK)
            episode.output_bytes += len(chunk)
            if not chunk:
                self._selector.unregister(episode.output_fd)
            elif episode.output_bytes > self._limits["max_output_bytes"]:
                self._end(episode, f"wrote more than {self._limits['max_output_bytes']} bytes of output")
        elif kind == "reply":
            chunk = os.read(episode.reply_fd, READ_CHUNK)
            if not chunk:
                self._selector.unregister(episode.reply_fd)
            episode.reply += chunk
            self._take_reply(episode)
        else:  # exited: what it wrote before exiting is read first, then why it ended
            self._drain(episode)
            if self._episodes.get(episode.number) is episode:
                status, usage = self._wait_status(episode)
                self._end(episode, describe_exit(status, usage, self._limits, self._role, before="replying"))

    def _take_reply(self, episode: Episode) -> None:
        limit = self._limits["max_output_bytes"]
        if b"\n" not in episode.reply:
            if len(episode.reply) > limit:
                self._end(episode, f"sent a reply of more than {limit} bytes")
            return
        line, episode.reply = episode.reply.split(b"\n", 1)
        if episode.call_id is None or episode.reply or len(line) > limit:
            reason = f"sent a reply of more than {limit} bytes" if len(line) > limit else "broke the protocol"
            self._end(episode, f"{self._role} process {reason}")
            return
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or not ({"value"} <= reply.keys() or "error" in reply):
                raise ValueError
        except ValueError:
            self._end(episode, f"{self._role} process sent a malformed reply")
            return
        call_id, episode.call_id, episode.deadline = episode.call_id, None, float("inf")
        if "error" in reply:
            if not episode.opened:  # start(item) failed: there is no episode to go on with
                self._discard(episode)
            self._send_error(call_id, str(reply["error"]), ended=not episode.opened)
            return
        message = {"id": call_id, "value": reply["value"]}
        if not episode.opened:
            episode.opened = True
            message["episode"] = episode.number
        self._reply(message)

    def _drain(self, episode: Episode) -> None:
        """Read what the exited child left in its pipes (a grandchild may hold them open)."""
        for fd, kind in ((episode.reply_fd, "reply"), (episode.output_fd, "output")):
            os.set_blocking(fd, False)
            while self._episodes.get(episode.number) is episode and self._selector.get_map().get(fd):
                try:
                    self._on_event(episode, kind, selectors.EVENT_READ)
                except BlockingIOError:  # nothing more there
                    break

    def _wait_status(self, episode: Episode) -> tuple[int, resource.struct_rusage]:
        if episode.wait_status is None:
            _, status, usage = os.wait4(episode.pid, 0)
            episode.wait_status = (status, usage)
        return episode.wait_status

    def _reap(self) -> None:
        """Collect every exited child: episodes' (their status kept) and orphans'."""
        by_pid = {e.pid: e for e in self._episodes.values()}
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in by_pid:
                by_pid[pid].wait_status = (status, usage)

    # -- ending episodes ------------------------------------------------------------------------

    def _send_error(self, request_id: int, reason: str, ended: bool) -> None:
        self._reply({"id": request_id, "error": reason, "ended": ended})

    def _end(self, episode: Episode, reason: str) -> None:
        """A fault ended the episode: its pending call fails with `reason`, and later calls too."""
        if episode.call_id is not None:
            self._send_error(episode.call_id, reason, ended=True)
        if episode.opened:
            self._ended[episode.number] = reason
        self._discard(episode)

    def _discard(self, episode: Episode) -> None:
        """Kill the episode's processes (and reap them), close its pipes, remove its files."""
        del self._episodes[episode.number]
        live = {e.pid for e in self._episodes.values()}
        reaped = episode.wait_status is not None  # then its pid may be another process's by now
        kill_trees(({episode.pid} if not reaped else set()) | orphans(live))
        for fd in episode.fds:
            if self._selector.get_map().get(fd) is not None:
                self._selector.unregister(fd)
            os.close(fd)
        shutil.rmtree(episode.workdir, ignore_errors=True)
