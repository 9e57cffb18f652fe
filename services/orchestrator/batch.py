"""From prompts to a TrainBatch: the step's generation requests, and its scored rollouts grouped by
prompt with group-normalised advantages (GRPO), rollouts older than `sync.max_staleness` left out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from learner.interface import TrainBatch, TrainSample
from learner.losses import group_advantages
from reward_workers.interface import ScoredRollout
from rollout_workers.interface import GenerationRequest
from services.config import JobConfig
from services.orchestrator.data import PromptOrder
from services.orchestrator.setup import JobInputs


def step_requests(cfg: JobConfig, inputs: JobInputs, order: PromptOrder) -> list[GenerationRequest]:
    """The next `prompts_per_step` items of the data order, a group of requests each."""
    requests = []
    for index in order.take(cfg.prompts_per_step):
        item = inputs.train_items[index]
        episode_item = item if cfg.rollout.environment else None  # what its reset receives
        requests += [
            GenerationRequest(item["id"], k, inputs.prompt_ids[item["id"]], episode_item)
            for k in range(cfg.rollout.samples_per_prompt)
        ]
    return requests


@dataclass
class BuiltBatch:
    batch: TrainBatch
    zero_signal_groups: int  # groups whose rewards were all equal (no learning signal)
    stale_dropped: int  # rollouts more than max_staleness versions behind the learner


def build_batch(cfg: JobConfig, step: int, scored: list[ScoredRollout], policy_version: int) -> BuiltBatch:
    """Group by prompt, normalise rewards within each group, enforce max_staleness."""
    algorithm = cfg.algorithm
    groups: dict[str, list[ScoredRollout]] = defaultdict(list)
    for s in scored:
        groups[s.rollout.prompt_id].append(s)
    samples, zero_signal, stale = [], 0, 0
    for members in groups.values():
        rewards = torch.tensor([m.reward for m in members], dtype=torch.float32)
        if bool((rewards == rewards[0]).all()):
            zero_signal += 1
            if algorithm.skip_zero_signal_groups:
                continue
        advantages = group_advantages(rewards, algorithm.scale_by_std, algorithm.advantage_eps)
        for member, advantage in zip(members, advantages.tolist()):
            r = member.rollout
            if policy_version - r.policy_version > cfg.sync.max_staleness:
                stale += 1
                continue
            if r.loss_mask is not None and not any(r.loss_mask):
                continue  # an episode that failed before the model acted: scored, nothing to train
            samples.append(
                TrainSample(
                    r.sample_id,
                    r.prompt_ids,
                    r.completion_ids,
                    r.behaviour_logprobs,
                    advantage,
                    r.policy_version,
                    loss_mask=r.loss_mask,
                    token_checksum=r.token_checksum,
                )
            )
    return BuiltBatch(
        TrainBatch(step=step, samples=samples, temperature=cfg.rollout.temperature), zero_signal, stale
    )
