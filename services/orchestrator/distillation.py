"""A distill step's batch (on-policy distillation): the student's rollouts of data.train, every
token scored by the stage's teacher after the teacher's own prompt (services/orchestrator/teachers.py),
each token's advantage the teacher's log-prob minus the behaviour log-prob
(learner/teacher.py `distillation_advantages`). The policy_gradient objective then trains the
student down the reverse KL to the teacher, with the usual TIS and clipping.

No group normalisation: the reward does not enter the loss, so every rollout within
sync.max_staleness trains, the ones of flat groups too; flat groups are only counted (as grpo's
are) so the step's metrics read the same.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from learner.interface import TrainBatch, TrainSample
from learner.samples import policy_mask
from learner.teacher import distillation_advantages
from reward_workers.interface import ScoredRollout
from services.config import JobConfig
from services.orchestrator.batch import BuiltBatch, groups_of, has_policy_tokens, is_flat, rollout_sample

# (prompt_ids, completion_ids) pairs and a temperature -> each completion token's log-prob
# (learner/teacher.py `Teacher.batch_token_logprobs`, here or in its actor).
TeacherScoring = Callable[[Sequence[tuple[Sequence[int], Sequence[int]]], float], list[list[float]]]


def actor_scoring(teacher_actor) -> TeacherScoring:
    """A teacher actor's `batch_token_logprobs`, waited for."""
    import ray

    def score(sequences, temperature: float) -> list[list[float]]:
        return ray.get(teacher_actor.batch_token_logprobs.remote(sequences, temperature))

    return score


def distillation_batch(
    cfg: JobConfig,
    step: int,
    scored: list[ScoredRollout],
    policy_version: int,
    teacher: TeacherScoring,
    teacher_prompt_ids: dict[str, list[int]],
) -> BuiltBatch:
    """The step's fresh rollouts with per-token advantages from `teacher`, which scores each
    completion after `teacher_prompt_ids[prompt id]` at the rollout temperature (the one the
    behaviour log-probs are at)."""
    groups = groups_of(scored, cfg.rollout.samples_per_prompt)
    zero_signal = sum(is_flat(members) for members in groups.values())
    fresh = [s.rollout for s in scored if policy_version - s.rollout.policy_version <= cfg.sync.max_staleness]
    trained = [r for r in fresh if has_policy_tokens(r)]
    samples = [rollout_sample(r, advantage=0.0) for r in trained]  # 0: replaced by its token advantages
    sequences = [(teacher_prompt_ids[r.prompt_id], r.completion_ids) for r in trained]
    started = time.perf_counter()
    scores = teacher(sequences, cfg.rollout.temperature) if sequences else []
    for sample, teacher_logprobs in zip(samples, scores):
        sample.token_advantages = distillation_advantages(sample, teacher_logprobs)
    extra = {"distill_teacher_seconds": time.perf_counter() - started}
    if samples:
        extra["distill_reverse_kl"] = reverse_kl_estimate(samples)
    return BuiltBatch(
        TrainBatch(step=step, samples=samples, temperature=cfg.rollout.temperature),
        zero_signal,
        len(groups) - zero_signal,
        len(scored) - len(fresh),
        extra,
    )


def reverse_kl_estimate(samples: list[TrainSample]) -> float:
    """The mean over the policy's tokens of behaviour minus teacher log-prob (the negated token
    advantages): the sampled estimate of KL(student || teacher) per token."""
    gaps = [-a for s in samples for a, m in zip(s.token_advantages, policy_mask(s)) if m]
    return sum(gaps) / max(len(gaps), 1)
