"""Per-token log-probs of completions under a causal LM, exactly as the rollout engines report them.

vLLM reports "processed" logprobs: log_softmax(logits / temperature) of the sampled token. The
learner must compute the same quantity, or the importance weights π_old / μ measure the
temperature instead of the policy gap.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def right_pad(rows: Sequence[Sequence[float | int]], value: float | int, dtype: torch.dtype) -> Tensor:
    """[B, max_len] tensor of the rows, padded on the right with `value`."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype).reshape(
        len(rows), width
    )


def completion_logprobs(
    model: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass over (prompt_ids, completion_ids) pairs.

    Returns (logprobs [B, T], mask [B, T] bool, entropy [B, T]) for the completion tokens, with
    T the longest completion; logprobs keep the graph to `model`'s parameters when grad is
    enabled, entropy (of the tempered distribution, a metric) never does. Padding holds 0.
    `model` is anything that calls like a Hugging Face causal LM and has `.device`
    (a transformers model, a peft model, a DeepSpeed engine wrapping one).
    """
    if any(len(prompt) == 0 for prompt, _ in sequences):
        raise ValueError("every sequence needs at least one prompt token")
    prompt_lens = torch.tensor([len(prompt) for prompt, _ in sequences])
    completion_lens = torch.tensor([len(completion) for _, completion in sequences])
    # Right padding: causal attention already hides the pads from every real token, and position
    # ids start at 0 in every row, so no attention mask is needed.
    input_ids = right_pad([list(p) + list(c) for p, c in sequences], 0, torch.long).to(model.device)
    targets = right_pad([c for _, c in sequences], 0, torch.long).to(model.device)
    batch_size, length = input_ids.shape
    width = targets.shape[1]

    # The logits at position j predict token j+1, so completion token t of row i is predicted at
    # prompt_len_i - 1 + t. Only the logits from the earliest such position on are computed.
    first = int(prompt_lens.min()) - 1
    logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=length - first).logits
    positions = (prompt_lens[:, None] - 1 - first + torch.arange(width)[None, :]).clamp(
        max=logits.shape[1] - 1
    )
    logits = logits[torch.arange(batch_size)[:, None], positions.to(logits.device)]  # [B, T, V]

    all_logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    mask = (torch.arange(width)[None, :] < completion_lens[:, None]).to(model.device)
    logprobs = all_logprobs.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = -(all_logprobs.exp() * all_logprobs).sum(-1).masked_fill(~mask, 0.0)
    return logprobs, mask, entropy
