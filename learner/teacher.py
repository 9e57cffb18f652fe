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

from core.dtypes import resolve_dtype
from learner.interface import TrainSample
from learner.logprobs import chunkable_head, completion_logprobs, right_pad
from learner.samples import policy_mask


class Teacher:
    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int = 16,
        chunk_tokens: int | None = 128,
    ):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, resolve_dtype(dtype, device))
        )
        self.model.requires_grad_(False).eval().to(device)
        self.batch_size, self.chunk_tokens = batch_size, chunk_tokens or 128
        self.head = chunkable_head(self.model)  # None: the model's own logits, whole sequences
        self.decoder = self.model.get_decoder()

    @torch.no_grad()
    def batch_token_logprobs(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], temperature: float
    ) -> list[list[float]]:
        """log softmax(logits / temperature) of each completion token given its prompt and the
        tokens before it, per (prompt_ids, completion_ids). Use the student's sampling
        temperature, the one its behaviour log-probs are at.

        The sequences that share a prompt (a group's samples; a teacher's prompt is long when it
        holds few-shot examples) share its forward: the prompt runs once, then up to `batch_size`
        of its completions at a time extend its KV cache (`_after_prompt`). A model whose LM
        head is not a plain linear map scores whole sequences, `batch_size` a forward."""
        if self.head is None:
            return self._whole_sequences(sequences, temperature)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for index, (prompt, _) in enumerate(sequences):
            by_prompt.setdefault(tuple(prompt), []).append(index)
        scores: list[list[float]] = [[] for _ in sequences]
        for prompt, members in by_prompt.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                rows = self._after_prompt(list(prompt), [sequences[i][1] for i in chunk], temperature)
                for index, row in zip(chunk, rows):
                    scores[index] = row
        return scores

    def _after_prompt(
        self, prompt: list[int], completions: list[Sequence[int]], temperature: float
    ) -> list[list[float]]:
        """The completions' token log-probs after one prompt: the backbone over the prompt (its
        last position predicts each completion's first token), its cache repeated per
        completion, then over the right-padded completions (causal: every pad comes after the
        real tokens, so none is seen); the LM head `chunk_tokens` tokens at a time."""
        from learner.token_logprobs import sampled_token_logprobs

        device = self.head.weight.device
        prompt_out = self.decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        hidden = [prompt_out.last_hidden_state[0, -1:].expand(len(completions), -1)]  # predicts token 0
        width = max(len(c) for c in completions)
        if width > 1:
            cache = prompt_out.past_key_values
            cache.batch_repeat_interleave(len(completions))
            ids = right_pad([list(c[:-1]) for c in completions], 0, torch.long, width - 1).to(device)
            hidden.append(self.decoder(input_ids=ids, past_key_values=cache).last_hidden_state)
        states = torch.cat([h if h.dim() == 3 else h[:, None] for h in hidden], dim=1)  # [n, width, H]
        mask = torch.arange(width)[None, :] < torch.tensor([len(c) for c in completions])[:, None]
        targets = right_pad([list(c) for c in completions], 0, torch.long, width)[mask].to(device)
        logprobs, _ = sampled_token_logprobs(
            states[mask.to(device)],
            self.head.weight,
            targets,
            temperature,
            self.chunk_tokens,
            with_entropy=False,
        )
        return [row.tolist() for row in logprobs.float().cpu().split([len(c) for c in completions])]

    def _whole_sequences(self, sequences, temperature: float) -> list[list[float]]:
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
