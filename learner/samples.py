"""What the learner makes of a batch's samples before any rank runs: which it refuses
(`refuse_untrusted`), whether the rest can be trained (`check_batch`), and the tokens the loss
trains on (`policy_mask`: the one place a multi-turn episode's `loss_mask` enters).

Multi-turn episodes (docs/agentic.md) interleave the policy's tokens with observation tokens in
`completion_ids`. Every completion token is scored (the observations are context for the next
turn), but only the policy's count: the loss, its token-mean denominators, the importance weights,
the sequence ratios (GSPO, sequence TIS), the clip fraction, the entropy, the mismatch KL and the
KL to π_ref all see the mask `loss_tensors` builds, False at observation tokens and padding.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import Tensor

from core.tokens import token_checksum
from learner.interface import TrainBatch, TrainSample
from learner.logprobs import right_pad

log = logging.getLogger(__name__)


def policy_mask(sample: TrainSample) -> list[int]:
    """Per completion token: 1 = sampled by the policy (trained), 0 = observation."""
    return [1] * len(sample.completion_ids) if sample.loss_mask is None else sample.loss_mask


def policy_tokens(sample: TrainSample) -> int:
    """The completion tokens the loss trains on."""
    return sum(policy_mask(sample))


def policy_token_count(samples: list[TrainSample]) -> int:
    """The tokens a token-mean loss over `samples` divides by (at least 1)."""
    return max(sum(policy_tokens(s) for s in samples), 1)


def mask_tensor(samples: list[TrainSample], width: int) -> Tensor:
    """[B, width] bool: True at the policy's tokens of each sample, False at observations and padding."""
    return right_pad([policy_mask(s) for s in samples], 0, torch.bool, width)


def loss_tensors(samples: list[TrainSample], width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(μ [B, width], advantages, mask [B, width] bool) of `samples`, as `policy_loss` takes
    them: the mask True at the policy's tokens only, μ 0 elsewhere (an observation's behaviour
    log-prob means nothing). Advantages are [B], or [B, width] when a sample has
    `token_advantages` (the others' scalar repeated over their tokens)."""
    mask = mask_tensor(samples, width)
    behaviour = right_pad([s.behaviour_logprobs for s in samples], 0.0, torch.float32, width)
    if any(s.token_advantages is not None for s in samples):
        rows = [
            [s.advantage] * len(s.completion_ids) if s.token_advantages is None else s.token_advantages
            for s in samples
        ]
        advantages = torch.where(mask, right_pad(rows, 0.0, torch.float32, width), 0.0)
    else:
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return torch.where(mask, behaviour, 0.0), advantages, mask


def untrusted_reason(sample: TrainSample) -> str | None:
    """Why the sample's tokens cannot be trained as they are, or None: ids other than the ones the
    rollout worker hashed, or a loss mask that is not one 0/1 per completion token."""
    if sample.token_checksum is not None:
        if token_checksum(sample.prompt_ids, sample.completion_ids) != sample.token_checksum:
            return "token_checksum differs from the one of its token ids"
    mask = sample.loss_mask
    if mask is not None and len(mask) != len(sample.completion_ids):
        return f"{len(mask)} loss_mask entries for {len(sample.completion_ids)} completion tokens"
    if mask is not None and any(m not in (0, 1) for m in mask):
        return "loss_mask entries other than 0 and 1"
    return None


def refuse_untrusted(batch: TrainBatch) -> tuple[TrainBatch, list[str]]:
    """The batch without its untrusted samples (`untrusted_reason`), and their ids; each refused
    one is logged. A refused sample is dropped, not trained: its tokens are not what was sampled.
    So is the other sample of its pair (`pair_id`): a preference needs both."""
    reasons = {id(s): untrusted_reason(s) for s in batch.samples}
    broken_pairs = {s.pair_id for s in batch.samples if reasons[id(s)] and s.pair_id is not None}
    kept, refused = [], []
    for sample in batch.samples:
        reason = reasons[id(sample)]
        if reason is None and sample.pair_id in broken_pairs:
            reason = f"the other sample of pair {sample.pair_id} was refused"
        if reason is None:
            kept.append(sample)
        else:
            log.warning("step %d: sample %s refused: %s", batch.step, sample.sample_id, reason)
            refused.append(sample.sample_id)
    return dataclasses.replace(batch, samples=kept), refused


def require_samples(batch: TrainBatch) -> None:
    if not batch.samples:
        raise ValueError(f"step {batch.step}: empty batch")


def check_batch(batch: TrainBatch) -> bool:
    """Raise on a malformed policy-gradient batch; False when its behaviour log-probs or
    advantages (at the policy's tokens) are not finite (the step is then skipped: checked here,
    not left to the loss, where sequence_mask mode would silently drop the sample)."""
    require_samples(batch)
    values = []
    for s in batch.samples:
        for name, per_token in (
            ("behaviour logprobs", s.behaviour_logprobs),
            ("token advantages", s.token_advantages),
        ):
            if per_token is not None and len(per_token) != len(s.completion_ids):
                raise ValueError(
                    f"sample {s.sample_id}: {len(per_token)} {name} "
                    f"for {len(s.completion_ids)} completion tokens"
                )
        values += [v for v, m in zip(s.behaviour_logprobs, policy_mask(s)) if m]
        if s.token_advantages is None:
            values.append(s.advantage)
        else:  # they replace the scalar, which is then not used
            values += [v for v, m in zip(s.token_advantages, policy_mask(s)) if m]
    return all(math.isfinite(v) for v in values)
