"""The policy-gradient objective: learner/losses.py's `policy_loss` over the policy's tokens."""

from __future__ import annotations

from torch import Tensor

from learner.config import AlgorithmConfig
from learner.interface import TrainBatch, TrainSample
from learner.losses import policy_loss
from learner.samples import check_batch, loss_tensors, policy_token_count


class PolicyGradient:
    def check(self, batch: TrainBatch) -> bool:
        return check_batch(batch)

    def temperature(self, batch: TrainBatch) -> float:
        return batch.temperature  # the sampling temperature: the engine's μ is at it too

    def denominator(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> float:
        return policy_token_count(samples) if algorithm.loss_aggregation == "token_mean" else len(samples)

    def needs_reference(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> bool:
        return algorithm.kl_coef > 0

    def loss(
        self, samples, new_logprobs: Tensor, old_logprobs: Tensor, ref_logprobs, algorithm, denominator=None
    ):
        behaviour, advantages, mask = (
            t.to(new_logprobs.device) for t in loss_tensors(samples, new_logprobs.shape[1])
        )
        return policy_loss(
            new_logprobs,
            old_logprobs,
            behaviour,
            ref_logprobs,
            advantages,
            mask,
            algorithm,
            denominator=denominator,
        )
