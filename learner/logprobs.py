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
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperature: float,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass over (prompt_ids, completion_ids) pairs.

    Returns (logprobs [B, T], mask [B, T] bool, entropy [B, T]) for the completion tokens, with
    T the longest completion; logprobs keep the graph to `model`'s parameters when grad is
    enabled, entropy (of the tempered distribution, a metric) never does. Padding holds 0.
    `model` is anything that calls like a Hugging Face causal LM and has `.device`
    (a transformers model, a peft model, a DeepSpeed engine wrapping one).

    With `chunk_tokens`, and a model whose LM head is a plain linear map (`chunkable_head`),
    the logits are never built: the backbone's hidden states at the completion positions go
    through `learner/token_logprobs.py`, `chunk_tokens` tokens at a time; otherwise the model's
    own logits, [B, T, V], then an fp32 log_softmax over all of them.
    """
    if any(len(prompt) == 0 for prompt, _ in sequences):
        raise ValueError("every sequence needs at least one prompt token")
    head = chunkable_head(model) if chunk_tokens else None
    if head is not None:
        return _chunked_completion_logprobs(model, head, sequences, temperature, chunk_tokens)
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


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a DeepSpeed engine and/or a peft model (its LoRA layers
    are in place, so the adapter, and `disable_adapter`, act through it)."""
    module = getattr(model, "module", model)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when the logits are exactly `hidden @ head.weight.T`: a plain Linear without
    bias, no logit soft-capping or scaling in the config, the weight not partitioned by ZeRO-3
    (reading it outside the head's forward would see an empty shard). Else None."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def _chunked_completion_logprobs(model, head, sequences, temperature: float, chunk_tokens: int):
    from learner.token_logprobs import sampled_token_logprobs

    lm = _causal_lm(model)
    device = head.weight.device
    prompt_lens = torch.tensor([len(prompt) for prompt, _ in sequences])
    completion_lens = torch.tensor([len(completion) for _, completion in sequences])
    input_ids = right_pad([list(p) + list(c) for p, c in sequences], 0, torch.long).to(device)
    targets = right_pad([c for _, c in sequences], 0, torch.long).to(device)
    width = targets.shape[1]
    mask = (torch.arange(width)[None, :] < completion_lens[:, None]).to(device)
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, H]
    # Completion token t of row i is predicted by the hidden state at prompt_len_i - 1 + t.
    rows, steps = mask.nonzero(as_tuple=True)
    positions = prompt_lens.to(device)[rows] - 1 + steps
    logprobs, entropy = sampled_token_logprobs(
        hidden[rows, positions], head.weight, targets[rows, steps], temperature, chunk_tokens=chunk_tokens
    )
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    return zeros.masked_scatter(mask, logprobs), mask, zeros.masked_scatter(mask, entropy.detach())
