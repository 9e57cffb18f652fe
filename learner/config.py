"""The learner's config sections: how it trains (`learner`) and the loss (`algorithm`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import Section
from weight_sync.config import LoraShape


class AlgorithmConfig(Section):
    scale_by_std: bool = True  # False = Dr. GRPO (advantage = r - mean)
    advantage_eps: float = 1e-6
    skip_zero_signal_groups: bool = True
    # Dynamic sampling (DAPO), run by the driver: a step whose groups have fewer than this many
    # with reward variance takes more prompts from the data order until it has them, at most
    # max_extra_prompts more (None: 2 x prompts_per_step). None = off. Signal groups beyond the
    # target are trained too; flat ones are left out as skip_zero_signal_groups says.
    min_signal_groups: int | None = Field(default=None, ge=1)
    max_extra_prompts: int | None = Field(default=None, ge=0)
    # ppo_clip: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A). cispo (MiniMax-M1): -sg(clip(ρ, 1-ε_low,
    # 1+ε_high))·A·log π_θ, so a clipped token still passes gradient, only with a bounded weight.
    loss: Literal["ppo_clip", "cispo"] = "ppo_clip"
    # token: ρ_t = π_θ/π_old per token. sequence (GSPO): one ratio per sequence, the geometric mean
    # exp(mean_t log ρ_t), clipped per sequence (GSPO's bounds are ~1e-3, far tighter than PPO's).
    ratio_level: Literal["token", "sequence"] = "token"
    # The clip bounds. With one optimizer step per batch (ppo_epochs = mini_batches = 1) the ratio
    # is 1 everywhere and the clip never binds; with more, π_old is the weights at the step's start.
    clip_eps_low: float = Field(default=0.2, ge=0)
    clip_eps_high: float = Field(default=0.28, ge=0)
    ppo_epochs: int = Field(default=1, ge=1)  # passes over the batch per learner step
    mini_batches: int = Field(default=1, ge=1)  # optimizer steps per pass (the batch split in order)
    tis_mode: Literal["token_truncate", "sequence_truncate", "sequence_mask", "off"] = "token_truncate"
    tis_cap: float = Field(default=2.0, gt=0)
    tis_mask_low: float = Field(default=0.5, gt=0)
    tis_mask_high: float = Field(default=2.0, gt=0)
    kl_coef: float = Field(default=0.0, ge=0)
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    # dpo batches: β of -log σ(β[(log π_θ(c) - log π_ref(c)) - (log π_θ(r) - log π_ref(r))]).
    dpo_beta: float = Field(default=0.1, gt=0)


class LearnerConfig(Section):
    # True: train a LoRA adapter on the frozen base (the lora_* fields). False: train every weight
    # of the model (same optimizer, ZeRO stage and losses; ~16 bytes a parameter for bf16 weights,
    # fp32 master copy and Adam moments, + a frozen copy of the base when algorithm.kl_coef > 0);
    # the sync payload is then full weights and the job's output a full model directory.
    lora: bool = True
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    # Micro-batches by padded tokens (rows x longest row), rows sorted by length so padding stays
    # small. None = micro_batch_size rows at a time in batch order (the split before budgets).
    max_tokens_per_micro_batch: int | None = Field(default=2048, ge=1)
    micro_batch_size: int = Field(default=16, ge=1)  # rows per micro-batch without a token budget
    # True: a micro-batch is one row of samples end to end (first-fit decreasing up to the token
    # budget; position ids restart at 0 per sample, so transformers keeps them apart: varlen
    # flash-attention on CUDA, a [row, row] block-diagonal mask with sdpa/eager). No padding, but
    # with a dense mask attention costs the whole row squared: on CPU (bench/bench_learner.py,
    # SmolLM2-135M, 2 cores, 2026-12-01) packed rows trained at 0.41x the sorted split's tokens/s
    # (22.9 s vs 9.5 s a step, 0 % vs 5.5 % padding). Turn it on with flash_attention_2 on CUDA.
    pack_sequences: bool = False
    # Log-probs of the sampled tokens this many tokens at a time straight from the LM head, never
    # the [tokens, vocab] logits (learner/token_logprobs.py); None = the model's full logits.
    # Falls back to the full logits where the head is not a plain linear map, and under ZeRO-3.
    logprob_chunk_tokens: int | None = Field(default=128, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    # torch threads per rank. fixed: the node's cores shared out among the learner ranks and the
    # rollout workers (OMP_NUM_THREADS). follow_free: at least that, plus the cores the other
    # processes leave idle, re-measured before every micro-batch (learner/threads.py).
    threads: Literal["fixed", "follow_free"] = "fixed"
    # A non-finite loss/gradient skips the step (adapter kept); this many in a row stop the job.
    max_consecutive_skipped_steps: int = Field(default=3, ge=1)
    # Data-parallel ranks: one Ray actor each, in one placement group, one torch.distributed world
    # (gloo on CPU, nccl on CUDA). ZeRO shards optimizer state (1), + gradients (2), + weights (3)
    # across them. A checkpoint resumes only on the number of ranks that wrote it.
    num_ranks: int = Field(default=1, ge=1)
    placement: Literal["pack", "spread"] = "pack"  # the placement group's strategy: one node, or many
    # Per rank: Ray's CPUs, GPUs and custom resources (e.g. {"learner_node": 1} to keep the ranks on
    # nodes started with `ray start --resources='{"learner_node": 8}'`).
    num_cpus: float = Field(default=0, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    resources: dict[str, float] = {}
    # A rank that dies, raises or does not answer within timeout_s (a step, a checkpoint, an export,
    # start-up) fails the group: it is restarted from the last checkpoint this many times, then the job
    # stops naming the rank and the cause. timeout_s also bounds every collective of the ranks.
    max_restarts: int = Field(default=2, ge=0)
    timeout_s: float = Field(default=900, gt=0)

    @model_validator(mode="after")
    def _packing_needs_a_budget(self) -> LearnerConfig:
        if self.pack_sequences and self.max_tokens_per_micro_batch is None:
            raise ValueError("learner.pack_sequences needs learner.max_tokens_per_micro_batch (a row's size)")
        return self

    @property
    def lora_shape(self) -> LoraShape:
        """The adapter this learner trains, as the rollout engines must serve it."""
        return LoraShape(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=tuple(self.lora_target_modules),
        )
