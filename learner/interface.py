"""What the learner trains on and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# What a batch trains (learner/objectives/): policy_gradient = GRPO/PPO with TIS (and on-policy
# distillation through `token_advantages`), sft = the NLL of the completions, dpo = the preference
# loss over pairs.
Objective = Literal["policy_gradient", "sft", "dpo"]


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
    # policy_gradient: one advantage per completion token, replacing `advantage` (on-policy
    # distillation: teacher log-prob minus μ, learner/teacher.py `distillation_advantages`).
    token_advantages: list[float] | None = None
    # dpo: the two samples of a pair share `pair_id`; `preferred` marks the chosen one. The pair
    # always trains in one micro-batch (learner/shards.py).
    pair_id: str | None = None
    preferred: bool | None = None
    # dpo: Σ log π_ref over the loss-mask tokens at temperature 1 (`Learner.score_sequences` with
    # the weights the reference is to be). None = the base model (the LoRA adapter disabled).
    reference_logprob: float | None = None


@dataclass
class TrainBatch:
    step: int
    samples: list[TrainSample]
    # The sampling temperature; policy_gradient scores logits / temperature. sft and dpo score at
    # temperature 1 whatever this says: they train the model's own distribution.
    temperature: float
    objective: Objective = "policy_gradient"
    # The optimizer's learning rate for this step (a job's stages may each have their own);
    # None = learner.learning_rate.
    learning_rate: float | None = None


@dataclass
class StepStats:
    """The fields of the policy-gradient loss (is_weight_*, mismatch_kl, clip_fraction, kl_ref) are
    0 for sft and dpo; dpo's own numbers are in `extra` (`dpo_reward_margin_mean`,
    `dpo_preference_accuracy`)."""

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
