"""What a batch trains (`TrainBatch.objective`), one module each; learner/shards.py plans a step
with the batch's objective, learner/learner.py computes its loss per micro-batch and
learner/steps.py its step's numbers from the same function over the whole batch.

  policy_gradient  GRPO/PPO/CISPO/GSPO with TIS (learner/losses.py); with `token_advantages`, on-
                   policy distillation (the teacher-minus-student log-prob as each token's advantage)
  sft              the mean negative log-likelihood of the loss-mask tokens (sft.py)
  dpo              the preference loss over pairs of samples (dpo.py)
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from learner.config import AlgorithmConfig
from learner.interface import TrainBatch, TrainSample
from learner.objectives.dpo import DirectPreference
from learner.objectives.policy_gradient import PolicyGradient
from learner.objectives.sft import SupervisedFineTuning


class Objective(Protocol):
    def check(self, batch: TrainBatch) -> bool:
        """Raise on a malformed batch; False when its inputs are not finite (the step is skipped)."""

    def temperature(self, batch: TrainBatch) -> float:
        """The temperature the learner scores the batch's tokens at."""

    def denominator(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> float:
        """What a mini-batch's summed loss is divided by (tokens, sequences or pairs)."""

    def needs_reference(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> bool:
        """Whether the loss takes π_ref per token (the base model: the LoRA adapter disabled)."""

    def loss(
        self,
        samples: list[TrainSample],
        new_logprobs: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor | None,
        algorithm: AlgorithmConfig,
        denominator: float | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss, metrics) of `samples` from their [B, T] log-probs (π_θ, π_old, π_ref | None);
        `denominator` as in `policy_loss`: the whole mini-batch's, when these are a micro-batch."""


OBJECTIVES: dict[str, Objective] = {
    "policy_gradient": PolicyGradient(),
    "sft": SupervisedFineTuning(),
    "dpo": DirectPreference(),
}
