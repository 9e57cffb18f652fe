"""The teacher of on-policy distillation: per-token log-probs of the student's sampled tokens under
another model (or the same base), and the per-token advantages they make.

The student samples; the teacher scores the student's tokens; each token's advantage is
A_t = log π_teacher(x_t) - log μ(x_t), the negative of the per-token reverse-KL estimate
log μ - log π_teacher (μ: the student's behaviour log-prob from the engine). A policy_gradient
batch whose samples carry these as `token_advantages` trains the student down the reverse KL
to the teacher with the usual TIS and clipping (learner/losses.py), each token on its own term
(no sum over later tokens).

`Teacher` is a plain class, no grad and no learner inside, so it can run anywhere, e.g. as a Ray
actor of its own (`ray.remote(Teacher)`): it is not meant to share the learner's process.
"""

from __future__ import annotations

from typing import Sequence

import torch

from learner.interface import TrainSample
from learner.logprobs import completion_logprobs
from learner.samples import policy_mask


class Teacher:
    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        device: str = "cpu",
        batch_size: int = 16,
        chunk_tokens: int | None = 128,
    ):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.requires_grad_(False).eval().to(device)
        self.batch_size, self.chunk_tokens = batch_size, chunk_tokens

    @torch.no_grad()
    def batch_token_logprobs(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], temperature: float
    ) -> list[list[float]]:
        """log softmax(logits / temperature) of each completion token given its prompt and the
        tokens before it, per (prompt_ids, completion_ids): `batch_size` sequences a forward.
        Use the student's sampling temperature, the one its behaviour log-probs are at."""
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            logprobs, _, _ = completion_logprobs(
                self.model, chunk, temperature, chunk_tokens=self.chunk_tokens
            )
            scores += [row[: len(c)].tolist() for row, (_, c) in zip(logprobs.float().cpu(), chunk)]
        return scores

    def token_logprobs(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], temperature: float
    ) -> list[float]:
        return self.batch_token_logprobs([(prompt_ids, completion_ids)], temperature)[0]


def distillation_advantages(sample: TrainSample, teacher_logprobs: Sequence[float]) -> list[float]:
    """The sample's `token_advantages`: teacher log-prob minus behaviour log-prob at the policy's
    tokens, 0 at observation tokens (they are not trained)."""
    if len(teacher_logprobs) != len(sample.completion_ids):
        raise ValueError(
            f"sample {sample.sample_id}: {len(teacher_logprobs)} teacher log-probs "
            f"for {len(sample.completion_ids)} completion tokens"
        )
    return [
        teacher - behaviour if m else 0.0
        for teacher, behaviour, m in zip(teacher_logprobs, sample.behaviour_logprobs, policy_mask(sample))
    ]
