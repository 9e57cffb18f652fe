"""What the learner trains on and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainSample:
    sample_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # μ_t from the inference engine
    advantage: float
    policy_version: int  # version that generated it
    # Per completion token, multi-turn episodes (docs/agentic.md): 1 = sampled by the policy (trained),
    # 0 = observation (context only; its behaviour log-prob is ignored). None = all ones.
    loss_mask: list[int] | None = None
    # core.tokens.token_checksum(prompt_ids, completion_ids) from the rollout worker; a sample
    # whose ids no longer match is refused (learner/shards.py). None = not checked.
    token_checksum: str | None = None


@dataclass
class TrainBatch:
    step: int
    samples: list[TrainSample]
    temperature: float  # the sampling temperature; the learner scores logits / temperature


@dataclass
class StepStats:
    step: int
    policy_version: int  # version after this step
    loss: float
    grad_norm: float
    is_weight_mean: float
    is_weight_max: float
    is_truncated_fraction: float
    mismatch_kl: float  # KL(μ || π_old) estimated on the sampled tokens
    clip_fraction: float
    entropy: float
    kl_ref: float
    tokens: int
    step_seconds: float
    skipped: bool = False  # non-finite loss/grad: step skipped, adapter unchanged
    rank_seconds: list[float] = field(default_factory=list)  # each learner rank's own time in the step
    padding_fraction: float = 0.0  # share of the tokens the forward passes computed that were padding
    extra: dict[str, float] = field(default_factory=dict)
    refused_sample_ids: list[str] = field(default_factory=list)  # untrusted tokens: not trained
