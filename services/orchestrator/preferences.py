"""Preference pairs for a dpo stage: from a file (services/orchestrator/demonstrations.py loads
it), or from each step's rollouts (online).

A file's pairs' reference log-probs are the
weights at the stage's start: scored once when the stage begins and kept in the run directory,
so a run resumed inside the stage trains against the same reference.

Online (iterative DPO), each step's groups make pairs of their best and worst rollout, and the
reference is the policy at the step's start: each step is one round of generate, rank by the
verifier, prefer -- as iterative DPO refreshes its reference every round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from learner.interface import TrainBatch, TrainSample
from reward_workers.interface import ScoredRollout
from services.orchestrator.batch import (
    BuiltBatch,
    data_sample,
    groups_of,
    has_policy_tokens,
    is_flat,
    rollout_sample,
)
from services.orchestrator.demonstrations import PreferencePair
from services.orchestrator.stages import Stage, stage_rows

ScoreSequences = Callable[[list[TrainSample]], list[float]]  # Σ log π of each, current weights


def pair_samples(pair: PreferencePair, tag: str, policy_version: int) -> list[TrainSample]:
    """The pair as two dpo samples, chosen first (`tag`: its stage and pass, `stage_rows`)."""
    return [
        data_sample(
            f"{pair.id}/{side}@{tag}",
            pair.prompt_ids,
            completion_ids,
            policy_version,
            pair_id=f"{pair.id}@{tag}",
            preferred=side == "chosen",
        )
        for side, completion_ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids))
    ]


class StageReference:
    """Σ log π_ref of every pair's answers, π_ref = the weights at the stage's start; scored when
    the stage begins and kept in `path` (a resumed run reads it back: the weights have moved)."""

    def __init__(self, path: Path, pairs: list[PreferencePair]):
        self.path, self.pairs = path, pairs
        self.logprobs: dict[str, float] | None = None  # sample id stem ("<pair>/<side>") -> Σ log π_ref

    def take(self, at_stage_start: bool, score_sequences: ScoreSequences) -> None:
        if self.logprobs is not None:
            return
        if self.path.exists():
            self.logprobs = json.loads(self.path.read_text())
            return
        if not at_stage_start:
            raise RuntimeError(
                f"{self.path} is missing: the stage's reference log-probs are written when it starts, "
                "and the run resumed after that without them"
            )
        samples = [sample for pair in self.pairs for sample in pair_samples(pair, "reference", 0)]
        scores = score_sequences(samples)
        self.logprobs = {s.sample_id.rsplit("@", 1)[0]: score for s, score in zip(samples, scores)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.logprobs))
        partial.replace(self.path)  # whole or absent

    def batch(self, stage: Stage, step: int, seed: int, policy_version: int) -> TrainBatch:
        """The step's pairs (`stage_rows`), each sample with its reference log-prob."""
        samples = [
            sample
            for row, tag in stage_rows(stage, step, len(self.pairs), seed)
            for sample in pair_samples(self.pairs[row], tag, policy_version)
        ]
        for sample in samples:
            sample.reference_logprob = self.logprobs[sample.sample_id.rsplit("@", 1)[0]]
        return TrainBatch(step, samples, temperature=1.0, objective="dpo")


def online_pairs_batch(
    stage: Stage,
    step: int,
    scored: list[ScoredRollout],
    samples_per_prompt: int,
    score_sequences: ScoreSequences,
) -> BuiltBatch:
    """Online dpo: each group whose best and worst rewards differ by more than the stage's
    min_margin makes a pair of them (ties: the first), scored against the policy at the step's
    start. Flat groups make none."""
    groups = groups_of(scored, samples_per_prompt)
    samples, flat = [], 0
    for (prompt_id, visit), members in groups.items():
        flat += is_flat(members)
        best = max(members, key=lambda m: m.reward)
        worst = min(members, key=lambda m: m.reward)
        if best.reward - worst.reward <= stage.config.min_margin:
            continue
        if not (has_policy_tokens(best.rollout) and has_policy_tokens(worst.rollout)):
            continue
        pair_id = f"{prompt_id}/{visit}@{step}"
        samples += [
            rollout_sample(best.rollout, 0.0, pair_id=pair_id, preferred=True),
            rollout_sample(worst.rollout, 0.0, pair_id=pair_id, preferred=False),
        ]
    if samples:
        for sample, reference in zip(samples, score_sequences(samples)):
            sample.reference_logprob = reference
    batch = TrainBatch(step, samples, temperature=1.0, objective="dpo")
    return BuiltBatch(batch, flat, len(groups) - flat, 0, extra={"dpo_pairs": len(samples) // 2})
