"""From prompts to a TrainBatch: the step's generation requests, and its scored rollouts grouped by
prompt with group-normalised advantages (GRPO), rollouts older than `sync.max_staleness` left out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from learner.interface import TrainBatch, TrainSample
from learner.losses import group_advantages
from reward_workers.interface import ScoredRollout
from rollout_workers.interface import GenerationRequest, Rollout, SamplingSettings
from services.config import JobConfig
from services.orchestrator.setup import JobInputs


def group_requests(
    cfg: JobConfig, inputs: JobInputs, items: list[int], first: int = 0
) -> list[GenerationRequest]:
    """A group of requests for each of a step's items from `first` on (dataset indices, in the
    order taken). An item the step took before gets the sample indices after its earlier
    group's, so its sample ids stay unique and its groups apart (`group_key`)."""
    size = cfg.rollout.samples_per_prompt
    requests = []
    for position in range(first, len(items)):
        item = inputs.train_items[items[position]]
        visit = items[:position].count(items[position])
        episode_item = item if cfg.rollout.environment else None  # what its reset receives
        requests += [
            GenerationRequest(item["id"], visit * size + k, inputs.prompt_ids[item["id"]], episode_item)
            for k in range(size)
        ]
    return requests


def step_sampling(cfg: JobConfig, step: int) -> SamplingSettings:
    """Seeded by step (each request by its sample id too), so a rerun draws the same samples."""
    return SamplingSettings(
        cfg.rollout.temperature, cfg.rollout.max_new_tokens, seed=cfg.seed * 1_000_003 + step
    )


def group_key(scored: ScoredRollout, samples_per_prompt: int) -> tuple[str, int]:
    """(prompt id, the step's visit of it): one group of `samples_per_prompt` samples."""
    return scored.rollout.prompt_id, scored.rollout.sample_index // samples_per_prompt


def groups_of(scored: list[ScoredRollout], samples_per_prompt: int) -> dict[tuple[str, int], list]:
    groups: dict[tuple[str, int], list[ScoredRollout]] = defaultdict(list)
    for s in scored:
        groups[group_key(s, samples_per_prompt)].append(s)
    return groups


def is_flat(members: list[ScoredRollout]) -> bool:
    """Every reward of the group equal: no GRPO signal (zero advantages)."""
    return all(m.reward == members[0].reward for m in members)


@dataclass
class BuiltBatch:
    batch: TrainBatch
    zero_signal_groups: int  # groups whose rewards were all equal (no learning signal)
    signal_groups: int  # groups with reward variance
    stale_dropped: int  # rollouts more than max_staleness versions behind the learner
    extra: dict[str, float] = field(default_factory=dict)  # a stage kind's own step metrics


def rollout_sample(rollout: Rollout, advantage: float, **fields) -> TrainSample:
    """A rollout as the learner trains it (`fields`: the other TrainSample fields an objective uses)."""
    return TrainSample(
        rollout.sample_id,
        rollout.prompt_ids,
        rollout.completion_ids,
        rollout.behaviour_logprobs,
        advantage,
        rollout.policy_version,
        loss_mask=rollout.loss_mask,
        token_checksum=rollout.token_checksum,
        **fields,
    )


def data_sample(
    sample_id: str, prompt_ids: list[int], completion_ids: list[int], policy_version: int, **fields
) -> TrainSample:
    """A completion from data (a demonstration, a preference pair's side) as the learner trains it:
    no behaviour log-probs (the policy never sampled it), no advantage."""
    return TrainSample(
        sample_id, prompt_ids, completion_ids, [], 0.0, policy_version=policy_version, **fields
    )


def has_policy_tokens(rollout: Rollout) -> bool:
    """False for an episode that failed before the model acted: scored, nothing to train."""
    return rollout.loss_mask is None or any(rollout.loss_mask)


def build_batch(cfg: JobConfig, step: int, scored: list[ScoredRollout], policy_version: int) -> BuiltBatch:
    """Group by prompt, normalise rewards within each group, enforce max_staleness."""
    algorithm = cfg.algorithm
    groups = groups_of(scored, cfg.rollout.samples_per_prompt)
    samples, zero_signal, stale = [], 0, 0
    for members in groups.values():
        rewards = torch.tensor([m.reward for m in members], dtype=torch.float32)
        if is_flat(members):
            zero_signal += 1
            if algorithm.skip_zero_signal_groups:
                continue
        advantages = group_advantages(rewards, algorithm.scale_by_std, algorithm.advantage_eps)
        for member, advantage in zip(members, advantages.tolist()):
            r = member.rollout
            if policy_version - r.policy_version > cfg.sync.max_staleness:
                stale += 1
                continue
            if has_policy_tokens(r):
                samples.append(rollout_sample(r, advantage))
    return BuiltBatch(
        TrainBatch(step=step, samples=samples, temperature=cfg.rollout.temperature),
        zero_signal,
        len(groups) - zero_signal,
        stale,
    )
