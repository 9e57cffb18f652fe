"""The thread that keeps a rollout worker's engine busy: continuous generation.

Every call that reaches the worker (Ray runs them on several threads) hands its work to this one
thread, the only one that touches the engine:
- a batch of requests joins the running ones at once (vLLM schedules new requests into its next
  step), and each prompt's group is handed back the moment its last sample finishes, so nothing
  waits for the slowest sample of a batch;
- a batch may require a minimum policy version (`min_version`): it waits until the worker serves
  at least that version, so a worker that is still catching up never generates with old weights;
- a weight load is exclusive: new requests are held back, the running ones finish (each
  completion comes from exactly one policy version), the load runs between two steps, and the
  held requests start on the new weights;
- a batch with an episode factory runs multi-turn episodes (rollout_workers/episodes.py): each
  turn is a request like any other, and between turns the episode talks to its environment on
  a thread of `environment_pool`, then posts back here. A weight load also waits for the open
  episodes to end, so every turn of an episode comes from one policy version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from .engine_rules import request_seed
from .episodes import Episode
from .interface import Completion, GenerationRequest, InferenceEngine, SamplingSettings

log = logging.getLogger("rft.rollout")

# A finished sample: the request, its completion, and the policy version that generated it.
Finished = tuple[GenerationRequest, Completion, int]
END = None  # what a batch's queue yields after its last group
ENVIRONMENT_THREADS = 16  # episodes talking to their environment at once, per worker
_CLOSED = RuntimeError("the rollout worker was closed")


@dataclass
class Batch:
    """Requests submitted together; their groups come out of `groups` as they finish."""

    requests: list[GenerationRequest]
    sampling: SamplingSettings
    min_version: int
    # request -> its Episode, for multi-turn batches; None = one completion per request.
    episode: Callable[[GenerationRequest], Episode] | None = None
    groups: queue.Queue = field(default_factory=queue.Queue)  # list[Finished] per group, then END
    # prompt_id -> samples not finished yet / finished so far (filled when the batch starts).
    left: dict[str, int] = field(default_factory=dict)
    done: dict[str, list[Finished]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class _EpisodeTurnDone:
    """Posted by an episode from the environment pool: it wants another turn, or it is over."""

    batch: Batch
    request: GenerationRequest
    episode: Episode
    version: int  # the policy version the episode runs on
    more: bool


@dataclass
class _Exclusive:
    run: Callable[[], object]
    result: Future
    asked_at: float
    wait_seconds: float = 0.0


class EngineLoop:
    def __init__(
        self,
        make_engine: Callable[[], InferenceEngine],
        served_version: Callable[[], int],
        on_step: Callable[[float, list[Finished]], None] = lambda seconds, finished: None,
    ):
        """`make_engine()` builds the engine, on the loop thread: vLLM on CPU pins the OpenMP
        threads of the thread that builds it, so that thread must be the one that runs it.
        `served_version()` is the policy version the engine serves (changed only by exclusive
        calls, i.e. on this thread); `on_step(seconds, finished)` is told about every step."""
        self.served_version, self.on_step = served_version, on_step
        self._inbox: queue.Queue = queue.Queue()
        self._held: list[Batch] = []  # waiting for their min_version, or for an exclusive call
        self._exclusives: deque[_Exclusive] = deque()
        # engine request id -> (batch, request, policy version, the episode the turn is of | None)
        self._running: dict[str, tuple[Batch, GenerationRequest, int, Episode | None]] = {}
        self._open_episodes = 0  # started, not ended: a weight load waits for them
        self._environment_pool: ThreadPoolExecutor | None = None
        self._next_id = 0
        self._broken: Exception | None = None  # an engine step failed: the engine is not used again
        self._closed = False
        built: Future = Future()
        threading.Thread(target=self._run, args=(make_engine, built), name="engine-loop", daemon=True).start()
        self.engine: InferenceEngine = built.result()  # raises what building it raised

    # ---- called from any thread

    def submit(
        self,
        requests: list[GenerationRequest],
        sampling: SamplingSettings,
        min_version: int = 0,
        episode: Callable[[GenerationRequest], Episode] | None = None,
    ) -> Batch:
        if self._closed:
            raise _CLOSED
        batch = Batch(list(requests), sampling, min_version, episode)
        self._inbox.put(batch)
        return batch

    def exclusive(self, run: Callable[[], object]) -> tuple[object, float]:
        """Run `run()` on the loop thread once no request is running; returns (its result, the
        seconds spent waiting for the running requests to finish)."""
        if self._closed:
            raise _CLOSED
        call = _Exclusive(run, Future(), time.perf_counter())
        self._inbox.put(call)
        result = call.result.result()
        return result, call.wait_seconds

    def running_requests(self) -> int:
        return len(self._running)

    def close(self) -> None:
        """Stop the loop (work not finished yet fails); the engine can then be freed."""
        self._closed = True
        self._inbox.put(_CLOSED)
        if self._environment_pool is not None:  # episodes between turns end with the worker
            self._environment_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the loop thread

    def _run(self, make_engine: Callable[[], InferenceEngine], built: Future) -> None:
        try:
            self.engine = make_engine()
        except BaseException as error:
            built.set_exception(error)
            return
        built.set_result(self.engine)
        while self._broken is not _CLOSED:
            try:
                if self._broken is not None:
                    self._refuse_all()
                    continue
                self._take_inbox(block=not self.engine.has_unfinished() and not self._exclusive_can_run())
                if self._exclusive_can_run():
                    self._run_exclusive()
                elif self.engine.has_unfinished():
                    self._step()
            except Exception as error:  # e.g. an engine step failed: all work given here fails
                log.exception("rollout engine failed; this worker takes no more work")
                self._broken = error

    def _exclusive_can_run(self) -> bool:
        return bool(self._exclusives) and not self.engine.has_unfinished() and not self._open_episodes

    def _take_inbox(self, block: bool) -> None:
        """Take what was posted, in order: batches wait in `_held` (and do not start while a load
        waits), exclusive calls queue, episode turns go on at once."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is _CLOSED:
                self._broken = _CLOSED
                self._refuse_all()
                return
            if isinstance(item, _Exclusive):
                self._exclusives.append(item)
            elif isinstance(item, _EpisodeTurnDone):
                self._episode_turn_done(item)
            else:
                self._held.append(item)
                self._start_ready()

    def _refuse_all(self) -> None:
        """Fail the work held and running, then (unless closed) wait for the next item and fail it."""
        held, self._held = self._held, []
        running = {id(batch): batch for batch, *_ in self._running.values()}
        self._running.clear()
        exclusives, self._exclusives = list(self._exclusives), deque()
        for item in [*held, *running.values(), *exclusives]:
            self._refuse(item)
        if self._broken is not _CLOSED:
            self._refuse(self._inbox.get())

    def _refuse(self, item) -> None:
        if isinstance(item, Batch):
            item.groups.put(self._broken)
        elif isinstance(item, _EpisodeTurnDone):
            item.batch.groups.put(self._broken)
        elif isinstance(item, _Exclusive):
            item.result.set_exception(self._broken)
        elif item is _CLOSED:
            self._broken = _CLOSED

    def _run_exclusive(self) -> None:
        call = self._exclusives.popleft()
        call.wait_seconds = time.perf_counter() - call.asked_at
        try:
            call.result.set_result(call.run())
        except BaseException as error:  # the caller re-raises it
            call.result.set_exception(error)
        self._start_ready()

    def _start_ready(self) -> None:
        """Start every held batch whose minimum version is served (none while a load waits)."""
        if self._exclusives:
            return
        version = self.served_version()
        ready = [batch for batch in self._held if batch.min_version <= version]
        self._held = [batch for batch in self._held if batch.min_version > version]
        for batch in ready:
            for request in batch.requests:
                batch.left[request.prompt_id] = batch.left.get(request.prompt_id, 0) + 1
                if batch.episode is None:
                    self._add(batch, request, version, request.prompt_ids, batch.sampling, None)
                else:
                    self._open_episodes += 1
                    self._in_environment(batch, request, batch.episode(request), version, Episode.start)
            if not batch.requests:
                batch.groups.put(END)

    def _add(self, batch, request, version, prompt_ids, sampling, episode: Episode | None) -> None:
        request_id, self._next_id = str(self._next_id), self._next_id + 1
        self._running[request_id] = (batch, request, version, episode)
        turn = f"/turn{len(episode.turn_versions)}" if episode and episode.turn_versions else ""
        seed = request_seed(sampling.seed, request.sample_id + turn)
        self.engine.add(request_id, prompt_ids, replace(sampling, seed=seed))

    # ---- episodes

    def _in_environment(self, batch, request, episode: Episode, version: int, call, *args) -> None:
        """Run `call(episode, *args)` (an environment step) on the pool; post back what follows."""
        if self._environment_pool is None:
            self._environment_pool = ThreadPoolExecutor(ENVIRONMENT_THREADS, thread_name_prefix="environment")

        def run() -> None:
            try:
                more = call(episode, *args)
            except Exception as error:  # a bug here, not in the environment (its errors are data)
                log.exception("episode %s failed", request.sample_id)
                more = episode.fail(f"{type(error).__name__}: {error}")
            self._inbox.put(_EpisodeTurnDone(batch, request, episode, version, more))

        self._environment_pool.submit(run)

    def _episode_turn_done(self, event: _EpisodeTurnDone) -> None:
        if event.more:
            sampling = replace(event.batch.sampling, max_new_tokens=event.episode.turn_budget())
            self._add(
                event.batch,
                event.request,
                event.version,
                event.episode.context_ids(),
                sampling,
                event.episode,
            )
            return
        self._open_episodes -= 1
        self._finished(event.batch, (event.request, event.episode.result(), event.version))

    def _step(self) -> None:
        started = time.perf_counter()
        finished = self.engine.step()
        done = []
        for request_id, completion in finished:
            batch, request, version, episode = self._running.pop(request_id)
            done.append((request, completion, version))
            if episode is None:
                self._finished(batch, (request, completion, version))
            else:
                self._in_environment(
                    batch, request, episode, version, Episode.after_turn, completion, version
                )
        self.on_step(time.perf_counter() - started, done)

    def _finished(self, batch: Batch, finished: Finished) -> None:
        """A sample is done: its group goes out when it was the group's last."""
        request = finished[0]
        group = batch.done[request.prompt_id]
        group.append(finished)
        batch.left[request.prompt_id] -= 1
        if batch.left[request.prompt_id] == 0:
            batch.groups.put(sorted(group, key=lambda f: f[0].sample_index))
            del batch.left[request.prompt_id], batch.done[request.prompt_id]
            if not batch.left:
                batch.groups.put(END)
