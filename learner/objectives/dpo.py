"""Direct preference optimisation over pairs of samples (`pair_id`, `preferred`):

  L = -log σ(β [(log π_θ(c) - log π_ref(c)) - (log π_θ(r) - log π_ref(r))])

per pair of a chosen c and a rejected r, mean over the pairs; log π(x) is the sum of the
log-probs of x's loss-mask tokens at temperature 1, β = `algorithm.dpo_beta`. π_ref is each
sample's `reference_logprob` when the batch gives them (`Learner.score_sequences` at the stage's
start: offline data once, online pairs per round), else the base model (the LoRA adapter off),
which is the stage's start only for a first stage on a fresh adapter. β × the bracket is the
"reward margin"; its mean and the fraction of pairs where it is positive are reported.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learner.config import AlgorithmConfig
from learner.interface import TrainBatch, TrainSample
from learner.samples import mask_tensor, require_samples


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    chosen_reference: Tensor,
    rejected_reference: Tensor,
    beta: float,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss over [P] sequence log-probs of P pairs: Σ_p -log σ(margin_p) / (P, or
    `denominator`), margin = β((chosen - chosen_reference) - (rejected - rejected_reference))."""
    margin = beta * ((chosen - chosen_reference) - (rejected - rejected_reference))
    loss = -torch.nn.functional.logsigmoid(margin).sum() / (
        denominator if denominator is not None else max(len(margin), 1)
    )
    with torch.no_grad():
        metrics = {
            "dpo_reward_margin_mean": margin.double().mean().item(),
            "dpo_preference_accuracy": (margin > 0).double().mean().item(),
        }
    return loss, metrics


def pairs(samples: list[TrainSample]) -> list[tuple[int, int]]:
    """(chosen, rejected) positions of each pair, in order of first appearance; raise unless
    every sample is one of a pair of one preferred and one rejected sample."""
    members: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        if sample.pair_id is None:
            raise ValueError(f"dpo sample {sample.sample_id} has no pair_id")
        members.setdefault(sample.pair_id, []).append(position)
    found = []
    for pair_id, positions in members.items():
        preferred = [samples[p].preferred for p in positions]
        if len(positions) != 2 or set(preferred) != {True, False}:
            raise ValueError(f"dpo pair {pair_id}: preferred={preferred}; needs one True and one False")
        chosen = positions[0] if preferred[0] else positions[1]
        found.append((chosen, positions[0] + positions[1] - chosen))
    return found


class DirectPreference:
    def check(self, batch: TrainBatch) -> bool:
        require_samples(batch)
        pairs(batch.samples)
        given = [s.reference_logprob for s in batch.samples if s.reference_logprob is not None]
        if given and len(given) != len(batch.samples):
            raise ValueError(
                f"step {batch.step}: reference_logprob on some dpo samples only; give all or none"
            )
        return all(math.isfinite(v) for v in given)

    def temperature(self, batch: TrainBatch) -> float:
        return 1.0

    def denominator(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> float:
        return len(samples) // 2  # pairs: a mini-batch holds whole ones (learner/shards.py)

    def needs_reference(self, samples: list[TrainSample], algorithm: AlgorithmConfig) -> bool:
        return samples[0].reference_logprob is None  # all or none (`check`)

    def loss(self, samples, new_logprobs: Tensor, old_logprobs, ref_logprobs, algorithm, denominator=None):
        mask = mask_tensor(samples, new_logprobs.shape[1]).to(new_logprobs.device)
        policy = torch.where(mask, new_logprobs, 0.0).sum(-1)
        if ref_logprobs is None:
            reference = torch.tensor(
                [s.reference_logprob for s in samples], dtype=policy.dtype, device=policy.device
            )
        else:
            reference = torch.where(mask, ref_logprobs, 0.0).sum(-1)
        chosen, rejected = (list(side) for side in zip(*pairs(samples)))
        return dpo_loss(
            policy[chosen],
            policy[rejected],
            reference[chosen],
            reference[rejected],
            algorithm.dpo_beta,
            denominator,
        )
