"""Reward workers: Ray actors that score rollouts with a sandboxed grader, and the pool that
spreads a batch over them.

Each actor holds one warm GraderSandbox (graders never run in the actor's own process). The
pool splits a batch across the actors (or takes shares as they arrive, e.g. groups streamed by
the rollout workers), runs the shares in parallel and returns results in order; a share whose
actor died is re-scored on a replacement actor, so no sample is lost.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import ray
from ray.exceptions import RayActorError

from core.logs import log_to_file
from core.telemetry import ComponentMetrics, MetricsContext
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import GraderConfig, MultiGrader, check_grader
from reward_workers.interface import ScoredRollout
from reward_workers.sandbox import GraderSandbox
from rollout_workers.interface import Rollout

log = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_SHARE = 3  # a share whose actors keep dying is an error, not a retry loop
SHUTDOWN_TIMEOUT_S = 10.0


def grader_sample(rollout: Rollout) -> dict:
    """What grade(sample, item) receives as `sample` (the OpenAI RFT grader convention); an
    episode's `output_text` is its last assistant message, and its messages are in `turns`."""
    sample = {"output_text": rollout.text, "finish_reason": rollout.finish_reason}
    if rollout.turns is not None:
        sample["turns"] = rollout.turns
    return sample


def score_with(sandbox: GraderSandbox, rollouts: list[Rollout], items: list[dict]) -> list[ScoredRollout]:
    results = sandbox.grade([grader_sample(r) for r in rollouts], items)
    return [_scored(r, g) for r, g in zip(rollouts, results)]


def _scored(rollout: Rollout, grade) -> ScoredRollout:
    """The grader's score, plus an episode's environment reward; an episode that failed before
    the model acted (or on an error of the worker's) scores 0 with the reason."""
    scored = ScoredRollout(
        rollout=rollout,
        reward=grade.reward,
        components=grade.components,
        grader_error=grade.error,
        hack_flags=grade.hack_flags,
        diagnostics=grade.diagnostics,
    )
    if rollout.turns is None:
        return scored
    scored.components = {**scored.components, "environment": rollout.environment_reward}
    scored.reward += rollout.environment_reward
    if rollout.error:
        scored.diagnostics = [f"episode: {rollout.error}", *scored.diagnostics]
        if rollout.finish_reason == "error" or not any(rollout.loss_mask or []):
            scored.reward, scored.grader_error = 0.0, f"episode failed: {rollout.error}"
    return scored


def hack_rates(grader: GraderConfig, scored: list[ScoredRollout]) -> dict[str, float]:
    """Share of the rollouts each grader flagged as a hack: the grader (any flag) and, for a
    multi grader, each sub-grader (flags it prefixes with `name:`)."""
    if not scored:
        return {}
    rates = {grader.name: sum(bool(s.hack_flags) for s in scored) / len(scored)}
    if isinstance(grader, MultiGrader):
        for name in grader.graders:
            flagged = sum(any(f.startswith(f"{name}:") for f in s.hack_flags) for s in scored)
            rates[name] = flagged / len(scored)
    return rates


def _items_for(rollouts: list[Rollout], items_by_prompt_id: dict[str, dict]) -> list[dict]:
    missing = sorted({r.prompt_id for r in rollouts} - items_by_prompt_id.keys())
    if missing:
        raise KeyError(f"no dataset item for prompt ids {missing[:5]}")
    return [items_by_prompt_id[r.prompt_id] for r in rollouts]


def score_locally(
    reward_cfg: RewardConfig,
    rollouts: list[Rollout],
    items_by_prompt_id: dict[str, dict],
    secrets: tuple[str, ...] = (),
) -> list[ScoredRollout]:
    """Score without Ray (for `rft eval`/`rft grade`): one sandbox, started and closed here."""
    items = _items_for(rollouts, items_by_prompt_id)
    with GraderSandbox(reward_cfg.grader, reward_cfg, secrets) as sandbox:
        return score_with(sandbox, rollouts, items)


class RewardWorker:
    """One reward worker: a warm sandboxed grader. Use as the Ray actor RewardWorkerActor."""

    def __init__(
        self,
        reward_cfg: RewardConfig,
        worker_id: str = "reward",
        metrics: MetricsContext | None = None,
        secrets: tuple[str, ...] = (),
    ):
        """`secrets`: values to redact from grader results besides those redaction.py finds."""
        log_to_file(worker_id)
        self._sandbox = GraderSandbox(reward_cfg.grader, reward_cfg, secrets)
        self.metrics = metrics and ComponentMetrics(
            metrics,
            "reward",
            worker_id,
            counters={
                "samples_graded": "samples graded",
                "grader_errors": "samples whose grader crashed, hung or returned garbage",
                "hack_flags": "samples a hack probe flagged",
                "grading_seconds": "wall time grading",
                "secrets_redacted": "secrets cut out of grader results (error text, flags, diagnostics)",
            },
            gauges={},
        )

    def score(self, rollouts: list[Rollout], items: list[dict]) -> list[ScoredRollout]:
        started, redacted = time.perf_counter(), self._sandbox.secrets_redacted
        scored = score_with(self._sandbox, rollouts, items)
        if self.metrics:
            self.metrics.add("secrets_redacted", self._sandbox.secrets_redacted - redacted)
            self.metrics.add("grading_seconds", time.perf_counter() - started)
            self.metrics.add("samples_graded", len(scored))
            self.metrics.add("grader_errors", sum(s.grader_error is not None for s in scored))
            self.metrics.add("hack_flags", sum(bool(s.hack_flags) for s in scored))
        return scored

    def protections(self) -> list[str]:
        return self._sandbox.protections

    def close(self) -> None:
        self._sandbox.close()


# Reward workers only wait on their sandboxes: they claim no CPU, so they fit any local cluster.
RewardWorkerActor = ray.remote(num_cpus=0)(RewardWorker)


class RewardPool:
    """`num_workers` reward-worker actors (default reward_cfg.num_workers)."""

    def __init__(
        self,
        reward_cfg: RewardConfig,
        num_workers: int | None = None,
        metrics: MetricsContext | None = None,
        secrets: tuple[str, ...] = (),
    ):
        """`secrets`: values to redact from grader results (e.g. the password of cluster.redis_url)."""
        check_grader(reward_cfg.grader)  # a grader that cannot run stops the job before any actor
        self._cfg, self._metrics, self._secrets = reward_cfg, metrics, tuple(secrets)
        self._started = 0
        self._actors = [self._start_actor() for _ in range(num_workers or reward_cfg.num_workers)]
        # Wait until every sandbox is up, so that a grader that cannot be isolated fails here.
        ray.get([actor.protections.remote() for actor in self._actors])

    def _start_actor(self):
        worker_id, self._started = f"reward-{self._started}", self._started + 1
        return RewardWorkerActor.remote(self._cfg, worker_id, self._metrics, self._secrets)

    @property
    def actors(self) -> list:
        return list(self._actors)

    def score(self, rollouts: list[Rollout], items_by_prompt_id: dict[str, dict]) -> list[ScoredRollout]:
        """Score every rollout against its prompt's dataset item; results in input order."""
        _items_for(rollouts, items_by_prompt_id)  # every item is there, before any actor works
        # Round-robin shares, one per actor: actor k gets positions k, k+n, k+2n, ...
        positions = [range(slot, len(rollouts), len(self._actors)) for slot in range(len(self._actors))]
        scored = self.score_shares(
            [[rollouts[i] for i in share] for share in positions if share], items_by_prompt_id
        )
        results: list[ScoredRollout | None] = [None] * len(rollouts)
        for i, scored_rollout in zip([i for share in positions for i in share], scored):
            results[i] = scored_rollout
        return results

    def score_shares(
        self, shares: Iterable[list[Rollout]], items_by_prompt_id: dict[str, dict]
    ) -> list[ScoredRollout]:
        """Score each share on the least busy actor as soon as it arrives: with shares coming off
        the rollout stream (a prompt's group each), grading runs while generation goes on.
        Results in share order. A share whose actor died is re-scored on a replacement."""
        results: list[list[ScoredRollout] | None] = []
        pending = {}  # ObjectRef -> (share index, share, slot, actor, attempt)
        busy = [0] * len(self._actors)

        def submit(index: int, share: list[Rollout], slot: int, attempt: int) -> None:
            actor = self._actors[slot]
            pending[actor.score.remote(share, _items_for(share, items_by_prompt_id))] = (
                index,
                share,
                slot,
                actor,
                attempt,
            )
            busy[slot] += 1

        def take(ref) -> None:
            index, share, slot, actor, attempt = pending.pop(ref)
            busy[slot] -= 1
            try:
                results[index] = ray.get(ref)
            except RayActorError as e:
                if attempt >= MAX_ATTEMPTS_PER_SHARE:
                    raise RuntimeError(f"reward worker died {attempt} times scoring the same share") from e
                if self._actors[slot] is actor:  # not replaced yet (it may have had several shares)
                    log.warning(
                        "reward worker %d died (%s); re-scoring its shares on a new one",
                        slot,
                        type(e).__name__,
                    )
                    self._actors[slot] = self._start_actor()
                submit(index, share, slot, attempt + 1)

        for share in shares:
            results.append(None)
            submit(len(results) - 1, share, busy.index(min(busy)), attempt=1)
            for ref in ray.wait(list(pending), num_returns=len(pending), timeout=0)[0]:
                take(ref)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            take(ref)
        return [scored for share in results for scored in share]

    def shutdown(self) -> None:
        """Close the sandboxes (bounded wait: a dead or stuck actor is simply killed), then the actors."""
        if not self._actors:
            return
        ray.wait(
            [actor.close.remote() for actor in self._actors],
            num_returns=len(self._actors),
            timeout=SHUTDOWN_TIMEOUT_S,
        )
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
