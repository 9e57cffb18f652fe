"""The learner group: N learner ranks (Ray actors of `learner.learner.Learner`) in one placement
group, forming one torch.distributed world, behind the interface one learner has.

- Start: a placement group of `num_ranks` bundles (`pack` or `spread`, each with the rank's
  CPUs, GPUs and custom resources); a task in bundle 0 finds rank 0's node address and a free
  port; every rank joins the world there (gloo on CPU, nccl on CUDA).
- A step: `learner/shards.py` splits the batch by tokens; every rank trains its shard at once
  (DeepSpeed all-reduces the gradients); the results merge into one StepStats.
- Weights and checkpoints: rank 0 exports the policy (under ZeRO-3 every rank takes part in
  gathering it); a checkpoint is every rank's part, in one directory.
- Faults: every call waits at most `timeout_s`. A rank that died, raised, or did not answer
  fails the call with `LearnerFailedError` naming the rank and the cause, and the whole group
  is torn down (a collective cannot go on without a rank); `restart()` starts it afresh, and
  the driver restores the last checkpoint into it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.net import free_port
from core.telemetry import MetricsContext
from learner.checkpoint import check_checkpoint_world, staged
from learner.config import LearnerConfig
from learner.distributed import WorldSpec
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.steps import train_batch

log = logging.getLogger(__name__)

# Ray rejects a bundle without resources; a rank that asks for none still gets a token CPU share.
MIN_BUNDLE_CPU = 0.01
PING_TIMEOUT_S = 10.0  # how long a rank that is still working has to answer a ping
GRACE_S = 10.0  # after one rank fails, how long the others have to report (a dead peer's error)
START_ATTEMPTS = 3  # a port found free can be taken before rank 0 listens on it (seen in CI)


class LearnerFailedError(RuntimeError):
    """A learner rank died, raised, or stopped answering; the group has been torn down."""

    def __init__(self, rank: int, cause: str, during: str):
        super().__init__(f"learner rank {rank} {cause} (during {during})")
        self.rank, self.cause, self.during = rank, cause, during


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Rank 0's node address and a port free there (run in rank 0's bundle)."""
    address = ray.util.get_node_ip_address()
    return address, free_port(address)


class LearnerGroup:
    def __init__(
        self,
        model_path: str,
        settings: LearnerConfig,
        learner_kwargs: dict[str, Any],
        name: str = "learner",
        metrics: MetricsContext | None = None,
    ):
        self.model_path, self.settings, self.learner_kwargs = model_path, settings, learner_kwargs
        self.name, self.metrics = name, metrics
        self.num_ranks, self.timeout_s = settings.num_ranks, settings.timeout_s
        self.algorithm = learner_kwargs["algorithm"]
        self.policy_version = 0  # as the ranks report it after each step
        self.restarts = 0
        self.starts = 0  # start attempts (restarts and retries on a lost port)
        self.ranks: list = []
        bundle = {"CPU": settings.num_cpus or MIN_BUNDLE_CPU, "GPU": settings.num_gpus, **settings.resources}
        self.placement = placement_group(
            [{k: v for k, v in bundle.items() if v}] * self.num_ranks, strategy=settings.placement.upper()
        )
        if not self._ready(self.placement.ready()):
            remove_placement_group(self.placement)
            raise RuntimeError(
                f"learner.num_ranks={self.num_ranks} ranks of {bundle} each (learner.placement="
                f"{settings.placement}) did not fit the Ray cluster within learner.timeout_s="
                f"{self.timeout_s:g} s; cluster resources: {ray.cluster_resources()}"
            )
        try:
            self.ranks = self._start_ranks()
        except BaseException:
            remove_placement_group(self.placement)
            raise

    # ---- the learner's interface -------------------------------------------------------------

    @property
    def sender(self):
        """The rank the weight-sync channel sends from (rank 0's actor)."""
        return self.ranks[0]

    def train_step(self, batch: TrainBatch) -> StepStats:
        def on_every_rank(shards):
            return self._wait([r.train_shard.remote(s) for r, s in zip(self.ranks, shards)], "train_shard")

        stats = train_batch(
            batch, self.num_ranks, self.settings, self.algorithm, self.policy_version, on_every_rank
        )
        self.policy_version = stats.policy_version
        return stats

    def score_sequences(self, samples: list[TrainSample]) -> list[float]:
        """`Learner.score_sequences` (a dpo stage's `reference_logprob`s): rank 0's, every rank
        scoring alike under ZeRO-3, where a forward gathers the weights from every rank."""
        scoring = self.ranks if self.settings.zero_stage == 3 else self.ranks[:1]
        return self._wait([rank.score_sequences.remote(samples) for rank in scoring], "score_sequences")[0]

    def export(self, payload: str) -> ray.ObjectRef:
        """The current policy (payload lora or full) as an object the driver owns, so that it
        outlives the ranks; checked for errors without fetching the weights."""
        # Only ZeRO-3 needs every rank (to gather the partitions); otherwise rank 0 has it all.
        exporting = self.ranks if self.settings.zero_stage == 3 else self.ranks[:1]
        calls = [rank.export_policy.options(num_returns=2).remote(payload) for rank in exporting]
        self._wait([version for version, _ in calls], "export_policy")
        return calls[0][1]

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Every rank's part into a directory next to `directory`, then renamed (one filesystem
        that every rank and the driver see: a shared volume on a cluster)."""
        with staged(directory) as staging:
            self._call_all("write_checkpoint", str(staging))
        return Path(directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        check_checkpoint_world(directory, self.num_ranks)
        [self.policy_version] = set(self._call_all("load_checkpoint", str(directory)))

    def save_policy(self, directory: str | Path) -> Path:
        return Path(self._call_all("save_policy", str(directory))[0])

    # ---- lifecycle ---------------------------------------------------------------------------

    def restart(self) -> None:
        """Tear the ranks down and start a fresh world (weights as at start: restore a checkpoint)."""
        self._kill_ranks()
        self.ranks, self.restarts, self.policy_version = [], self.restarts + 1, 0
        self.ranks = self._start_ranks()

    def shutdown(self) -> None:
        self._kill_ranks()
        remove_placement_group(self.placement)

    def _start_ranks(self) -> list:
        """Start every rank; again on a fresh port (at most START_ATTEMPTS times) when rank 0 lost
        the port found free to another process before it could listen on it."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._try_start_ranks()
            except LearnerFailedError as failure:
                if attempt == START_ATTEMPTS or "address already in use" not in failure.cause:
                    raise  # (_wait has killed the ranks of the failed attempt either way)
                log.warning("%s; starting the learner ranks again on another port", failure)
        raise AssertionError("unreachable")

    def _try_start_ranks(self) -> list:
        from learner.learner import Learner

        address, port = self._wait(
            [_rendezvous_address.options(scheduling_strategy=self._bundle(0)).remote()], "rendezvous"
        )[0]
        self.starts += 1  # names must be new: a killed actor's may not be free yet
        suffix = f"-start{self.starts}" if self.starts > 1 else ""
        ranks = [
            ray.remote(Learner)
            .options(
                name=f"{self.name}-{rank}{suffix}",
                num_cpus=self.settings.num_cpus,
                num_gpus=self.settings.num_gpus,
                resources=self.settings.resources,
                scheduling_strategy=self._bundle(rank),
                max_restarts=0,  # the group restarts its ranks together
                max_concurrency=2,  # a ping is answered while a step runs
            )
            .remote(
                self.model_path,
                metrics=self.metrics,
                world=WorldSpec(rank, self.num_ranks, address, port, self.timeout_s),
                **self.learner_kwargs,
            )
            for rank in range(self.num_ranks)
        ]
        self.ranks = ranks
        self._wait([rank.process_id.remote() for rank in ranks], "start-up")  # the world has formed
        log.info("learner group up: %d rank(s) at %s:%d", self.num_ranks, address, port)
        return ranks

    def _bundle(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)

    def _kill_ranks(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)

    def _ready(self, ref: ray.ObjectRef) -> bool:
        ready, _ = ray.wait([ref], timeout=self.timeout_s)
        return bool(ready)

    # ---- calls and faults --------------------------------------------------------------------

    def _call_all(self, method: str, *args) -> list:
        return self._wait([getattr(rank, method).remote(*args) for rank in self.ranks], method)

    def _wait(self, refs: list[ray.ObjectRef], during: str) -> list:
        """Every ref's value, in order, within timeout_s; else tear the group down and raise
        LearnerFailedError for the rank that failed first in importance: one that died, then
        one that does not answer, then one that raised, then one that is merely late."""
        index = {ref: position for position, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        errors: dict[int, BaseException] = {}
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                results[index[ready[0]]] = ray.get(ready[0])
            except Exception as error:  # any failure of a rank fails the group
                errors[index[ready[0]]] = error
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if not errors and not pending:
            return results
        failure = self._diagnose(errors, [index[ref] for ref in pending], during)
        self._kill_ranks()
        raise failure

    def _diagnose(self, errors: dict[int, BaseException], late: list[int], during: str) -> LearnerFailedError:
        dead = [r for r, e in errors.items() if isinstance(e, ray.exceptions.RayActorError)]
        if dead:
            return LearnerFailedError(dead[0], f"died: {_summary(errors[dead[0]])}", during)
        if late:
            silent = self._not_answering(late)
            if silent:
                return LearnerFailedError(silent[0], f"did not answer within {self.timeout_s:g} s", during)
        if errors:
            rank = min(errors)
            return LearnerFailedError(rank, f"raised {_summary(errors[rank])}", during)
        return LearnerFailedError(
            late[0],
            f"answers pings but did not finish within learner.timeout_s={self.timeout_s:g} s "
            "(stuck in a collective, or the timeout is too short for a step)",
            during,
        )

    def _not_answering(self, candidates: list[int]) -> list[int]:
        """The ranks among `candidates` (indices into self.ranks) that do not answer a ping."""
        pings = {self.ranks[r].process_id.remote(): r for r in candidates if r < len(self.ranks)}
        if not pings:
            return []
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        return sorted(set(pings.values()) - {pings[ref] for ref in answered})


def _summary(error: BaseException) -> str:
    """One line: the exception's type, its message's first line and, where the message goes on
    (Ray's report of an actor that died in its constructor ends with the constructor's error),
    its last line."""
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the rank's own exception
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(cause).__name__}: {text}"[:600]
