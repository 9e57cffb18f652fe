"""Rejection-sampling SFT (a `rejection_sft` stage): each step is a round -- the rollout workers
sample the step's prompts from the current policy, the reward workers grade them, and the ones
that pass become the step's sft data (the loss on the policy's tokens, as for demonstrations).

A rollout passes when its reward is at least the stage's `min_reward`; without one, the best of
each group whose rewards are not all equal (ties: the first) -- so an all-wrong group, or one
where every sample scored alike, teaches nothing. The round's pass rate is a step metric.
"""

from __future__ import annotations

from learner.interface import TrainBatch
from reward_workers.interface import ScoredRollout
from services.orchestrator.batch import BuiltBatch, groups_of, has_policy_tokens, is_flat, rollout_sample


def passing(members: list[ScoredRollout], min_reward: float | None) -> list[ScoredRollout]:
    """The group's rollouts that pass (see the module's docstring)."""
    if min_reward is not None:
        return [m for m in members if m.reward >= min_reward]
    return [] if is_flat(members) else [max(members, key=lambda m: m.reward)]


def rejection_batch(
    step: int, scored: list[ScoredRollout], samples_per_prompt: int, min_reward: float | None
) -> BuiltBatch:
    groups = groups_of(scored, samples_per_prompt)
    kept, flat = [], 0
    for members in groups.values():
        flat += is_flat(members)
        kept += passing(members, min_reward)
    samples = [rollout_sample(m.rollout, 0.0) for m in kept if has_policy_tokens(m.rollout)]
    batch = TrainBatch(step, samples, temperature=1.0, objective="sft")
    pass_rate = len(kept) / len(scored) if scored else 0.0
    return BuiltBatch(batch, flat, len(groups) - flat, 0, extra={"rejection_pass_rate": pass_rate})
