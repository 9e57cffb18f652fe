"""What one step did (`StepRecord`), and the one place its metrics are assembled from it
(`step_metrics`) and its rollouts written to samples.jsonl (`write_samples`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from learner.interface import StepStats
from reward_workers.interface import ScoredRollout
from reward_workers.pool import hack_rates
from services.config import JobConfig
from services.orchestrator.batch import BuiltBatch
from services.orchestrator.evaluation import heldout_metrics, heldout_sets_metrics
from services.orchestrator.selection import StepPrompts
from weight_sync.channel import SyncResult


@dataclass
class StepRecord:
    """Filled in by the main loop's steps, in order."""

    step: int  # the step's index; once recorded, `step + 1` steps are done
    policy_version: int  # the version the learner had when the step's batch was built
    scored: list[ScoredRollout]
    replayed: int  # of `scored`, taken from the stream (a resumed run) instead of generated
    prompts: StepPrompts  # the prompts it took from the data order (dynamic sampling's, skipped)
    generation_seconds: float  # submitting the step's prompts until its last group was back
    reward_seconds: float  # grading left after the last group arrived
    built: BuiltBatch | None = None
    stats: StepStats | None = None  # None when the batch was empty (every group flat or stale)
    sync: SyncResult | None = None  # None when no new version was published
    rollout_workers: int = 0
    workers_replaced: int = 0  # during this step
    requests_reissued: int = 0  # during this step
    heldout: dict[str, float] = field(default_factory=dict)  # on evaluation steps
    heldout_sets: dict[str, dict] = field(default_factory=dict)  # eval.extra_heldout, on the last step

    @property
    def trained_ids(self) -> set[str]:
        """The sample ids this step trained on (none when the learner skipped the step; never one
        the learner refused for its tokens)."""
        if self.stats is None or self.stats.skipped:
            return set()
        return {sample.sample_id for sample in self.built.batch.samples} - set(self.stats.refused_sample_ids)


@dataclass
class StepMetrics:
    """The arguments of `RunMetrics.record` for one step."""

    values: dict[str, float]
    counts: dict[str, float]
    hack_rates: dict[str, float]
    workers: dict[str, int]
    staleness: list[int] | None
    per_worker: dict[str, dict[str, float]]


def rollout_stats(scored: list[ScoredRollout], seconds: float) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float64)
    lengths = [len(s.rollout.completion_ids) for s in scored]
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "completion_length_mean": sum(lengths) / len(lengths),
        "truncated_completions_fraction": sum(s.rollout.finish_reason == "length" for s in scored)
        / len(scored),
        "rollout_tokens_per_second": sum(lengths) / max(seconds, 1e-9),
    }


def step_metrics(cfg: JobConfig, record: StepRecord, policy_version: int) -> StepMetrics:
    """Every number the step reports (`policy_version`: the learner's after the step)."""
    scored, trained = record.scored, record.trained_ids
    values: dict[str, Any] = {"rollout_workers": record.rollout_workers}
    if scored:  # none in an sft step
        values.update(rollout_stats(scored, record.generation_seconds))
        values.update(
            zero_signal_groups=record.built.zero_signal_groups,
            signal_groups=record.built.signal_groups,
            generation_seconds=record.generation_seconds,
            reward_seconds=record.reward_seconds,
            staleness_max=max(record.policy_version - s.rollout.policy_version for s in scored),
        )
    if record.built is not None:
        values.update(record.built.extra)  # a stage kind's own: pass rate, pairs, reverse KL
    if cfg.algorithm.min_signal_groups is not None:
        values["extra_prompts"] = record.prompts.extra
    if cfg.data.difficulty_filter is not None:
        values["filter_skipped_prompts"] = record.prompts.skipped
    per_worker = {}
    if record.stats is not None:
        values.update({k: v for k, v in record.stats.__dict__.items() if isinstance(v, (int, float))})
        values["learner_step_seconds"] = record.stats.step_seconds
        values.update(record.stats.extra)  # e.g. mismatch_kl_lag<k>
        per_worker["learner_rank_step_seconds"] = {
            f"learner-{rank}": seconds for rank, seconds in enumerate(record.stats.rank_seconds)
        }
    if record.sync is not None:
        values["weight_sync_seconds"] = record.sync.load_seconds
        per_worker["weight_sync_worker_seconds"] = record.sync.worker_seconds
        per_worker["weight_sync_pause_seconds"] = record.sync.pause_seconds
    values.update(step=record.step + 1, policy_version=policy_version)
    if record.heldout:
        values.update(heldout_metrics(record.heldout))
    values.update(heldout_sets_metrics(record.heldout_sets))
    counts = {
        "grader_errors": sum(s.grader_error is not None for s in scored),
        "stale_rollouts_dropped": record.built.stale_dropped,
        "samples_trained": len(trained),
        "skipped_steps": int(record.stats is not None and record.stats.skipped),
        "rollouts_scored": len(scored) - record.replayed,
        "rollouts_replayed": record.replayed,
        "rollout_workers_replaced": record.workers_replaced,
        "requests_reissued": record.requests_reissued,
    }
    lags = [record.policy_version - sample.policy_version for sample in record.built.batch.samples]
    return StepMetrics(
        values,
        counts,
        hack_rates(cfg.reward.grader, scored),
        workers={
            "rollout": record.rollout_workers,
            "reward": cfg.reward.num_workers,
            "learner": cfg.learner.num_ranks,
        },
        staleness=lags if trained else None,
        per_worker=per_worker,
    )


def write_samples(samples_log: IO[str], record: StepRecord) -> None:
    """One line per rollout: text, reward breakdown, and whether it was trained (`rft report`
    and the exactly-once tests read this)."""
    trained = record.trained_ids
    for s in record.scored:
        samples_log.write(
            json.dumps(
                {
                    "step": record.step + 1,
                    "policy_version": s.rollout.policy_version,
                    "worker_id": s.rollout.worker_id,
                    **s.grading_record(),
                    "trained": s.rollout.sample_id in trained,
                }
            )
            + "\n"
        )
    samples_log.flush()
