"""The GRPO loss with truncated importance sampling (TIS), as pure tensor functions.

Notation, per completion token t of sequence i (all log-probs of the sampled token, after
temperature):
  behaviour_logprobs  μ      what the inference engine reported when it sampled the token
  old_logprobs        π_old  the learner's weights at the start of the step (no grad)
  new_logprobs        π_θ    the weights being trained (with grad)
  ref_logprobs        π_ref  the base model (adapter disabled)

Tensors are [B, T] (right-padded), `mask` marks the real completion tokens, `advantages` is [B]
(one per sequence) or [B, T] (one per token: on-policy distillation's teacher-minus-student).
Every function works in any float dtype; padding positions may hold any finite value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.config import AlgorithmConfig


def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantages of the G samples of one prompt: (r - mean) / (std + eps), or r - mean (Dr. GRPO).

    Uses the population std (divide by G), so a group of one gives 0 rather than NaN.
    A group whose rewards are all equal gets all-zero advantages: it carries no signal.
    """
    if (rewards == rewards[0]).all():
        # Explicit: float rounding in mean() leaves ~1e-8 residues that eps would scale to ~0.05.
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    if not scale_by_std:
        return centred
    return centred / (rewards.std(correction=0) + eps)


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(p || q) from samples of p, given log_ratio = log q - log p:
    exp(x) - x - 1. Unbiased, never negative, lower variance than -x."""
    return torch.exp(log_ratio) - log_ratio - 1


def importance_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cfg: AlgorithmConfig
) -> tuple[Tensor, Tensor]:
    """TIS weights correcting for sampling from μ while training π_old: ([B, T] weights, [B] keep).

    token_truncate:    w_t = min(exp(π_old,t - μ_t), C)
    sequence_truncate: w_t = min(exp(Σ_t (π_old - μ)), C) for every token of the sequence
    sequence_mask:     w_t = 1, and keep[i] = False when the geometric-mean ratio
                       exp(mean_t (π_old - μ)) is outside [tis_mask_low, tis_mask_high]
    off:               w_t = 1
    Both are detached: the weights rescale the gradient, they are not trained through.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs - behaviour_logprobs, 0.0).detach()
    keep = torch.ones(log_ratio.shape[0], dtype=torch.bool, device=log_ratio.device)
    weights = torch.ones_like(log_ratio)
    if cfg.tis_mode == "token_truncate":
        weights = log_ratio.exp().clamp(max=cfg.tis_cap)
    elif cfg.tis_mode == "sequence_truncate":
        sequence_weight = log_ratio.sum(-1).exp().clamp(max=cfg.tis_cap)
        weights = sequence_weight[:, None].expand_as(log_ratio)
    elif cfg.tis_mode == "sequence_mask":
        geometric_mean = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).exp()
        keep = (geometric_mean >= cfg.tis_mask_low) & (geometric_mean <= cfg.tis_mask_high)
    return weights, keep


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped, importance-weighted policy-gradient loss plus β·k3 to the reference.

    Per token, with ρ the ratio π_θ/π_old (`cfg.ratio_level`: token: ρ_t = exp(π_θ,t - π_old,t);
    sequence, GSPO: ρ_i = exp(mean_t (π_θ - π_old)) for every token of sequence i):
      ppo_clip: L_t = -w_t · min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) + β·k3
      cispo:    L_t = -w_t · sg(clip(ρ, 1-ε_low, 1+ε_high)) · A · π_θ,t + β·k3
    token_mean:    Σ_{i,t} L / (number of valid tokens)
    sequence_mean: Σ_i (mean_t L_i) / (number of sequences)
    Sequences dropped by sequence_mask contribute 0 but still count in the denominator, so the
    gradient scale does not depend on how many were dropped. `denominator` overrides that count
    with the whole batch's when this call sees only one micro-batch of it; the micro-batch
    losses then sum to the batch loss.

    Metrics (over valid tokens): is_weight_mean/max; is_truncated_fraction = tokens whose weight hit
    the cap (sequence_mask: fraction of sequences dropped); mismatch_kl = k3 estimate of
    KL(μ || π_old) on the sampled tokens; clip_fraction = tokens where the clip acts (ppo_clip:
    the clipped branch is the minimum, its gradient zero; cispo: ρ outside the bounds, its weight
    capped); kl_ref = k3 estimate of KL(π_θ || π_ref) (0 without ref).
    """
    mask = mask.bool()
    weights, keep = importance_weights(old_logprobs, behaviour_logprobs, mask, cfg)
    trained = mask & keep[:, None]
    old_logprobs = old_logprobs.detach()

    log_ratio = torch.where(mask, new_logprobs - old_logprobs, 0.0)
    if cfg.ratio_level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(
            log_ratio
        )
    ratio = torch.exp(log_ratio)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(ratio.dtype)
    bounded = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    if cfg.loss == "cispo":
        per_token = -weights * bounded.detach() * adv * new_logprobs
        clip_active = bounded != ratio
    else:
        unclipped, clipped = ratio * adv, bounded * adv
        per_token = -weights * torch.minimum(unclipped, clipped)
        clip_active = clipped < unclipped
    kl_ref = None
    if ref_logprobs is not None:
        kl_ref = k3(ref_logprobs.detach() - new_logprobs)
        per_token = per_token + cfg.kl_coef * kl_ref
    per_token = torch.where(trained, per_token, 0.0)

    if cfg.loss_aggregation == "token_mean":
        total = per_token.sum()
        count = mask.sum()
    else:
        total = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        count = mask.shape[0]
    loss = total / (denominator if denominator is not None else max(int(count), 1))

    with torch.no_grad():
        if cfg.tis_mode == "sequence_mask":
            truncated = (~keep).double().mean().item()
        elif cfg.tis_mode == "off":
            truncated = 0.0
        else:
            truncated = _token_mean(weights >= cfg.tis_cap, mask)
        metrics = {
            "is_weight_mean": _token_mean(weights, mask),
            "is_weight_max": weights[mask].max().item() if mask.any() else 0.0,
            "is_truncated_fraction": truncated,
            "mismatch_kl": _token_mean(k3(torch.where(mask, old_logprobs - behaviour_logprobs, 0.0)), mask),
            "clip_fraction": _token_mean(clip_active, mask),
            "kl_ref": _token_mean(kl_ref, mask) if kl_ref is not None else 0.0,
        }
    return loss, metrics


def _token_mean(values: Tensor, mask: Tensor) -> float:
    return torch.where(mask, values.double(), 0.0).sum().item() / max(int(mask.sum()), 1)
