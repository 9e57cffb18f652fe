"""Supervised fine-tuning: the negative log-likelihood of the completions' loss-mask tokens (the
assistant's; prompts are never in `completion_ids`, and a multi-turn sample's observation tokens
have `loss_mask` 0), token-mean over the batch, scored at temperature 1 (the model's own
distribution, not the sampling one), with no importance weights and no reference."""

from __future__ import annotations

import torch
from torch import Tensor

from learner.config import AlgorithmConfig
from learner.interface import TrainBatch, TrainSample
from learner.samples import mask_tensor, policy_token_count, require_samples


def sft_loss(new_logprobs: Tensor, mask: Tensor, denominator: float | None = None) -> Tensor:
    """-Σ_{i,t: mask} log π_θ / (the number of mask tokens, or `denominator`)."""
    total = -torch.where(mask, new_logprobs, 0.0).sum()
    return total / (denominator if denominator is not None else max(int(mask.sum()), 1))


class SupervisedFineTuning:
    def check(self, batch: TrainBatch) -> bool:
        require_samples(batch)
        return True  # nothing from outside the learner enters the loss

    def temperature(self, batch: TrainBatch) -> float:
        return 1.0

    def denominator(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> float:
        return policy_token_count(samples)

    def needs_reference(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> bool:
        return False

    def loss(self, samples, new_logprobs: Tensor, old_logprobs, ref_logprobs, algorithm, denominator=None):
        mask = mask_tensor(samples, new_logprobs.shape[1]).to(new_logprobs.device)
        return sft_loss(new_logprobs, mask, denominator), {}
