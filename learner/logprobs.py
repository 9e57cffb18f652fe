"""Per-token log-probs of completions under a causal LM, exactly as the rollout engines report them.

vLLM reports "processed" logprobs: log_softmax(logits / temperature) of the sampled token. The
learner must compute the same quantity, or the importance weights π_old / μ measure the
temperature instead of the policy gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


def right_pad(
    rows: Sequence[Sequence[float | int]], value: float | int, dtype: torch.dtype, width: int | None = None
) -> Tensor:
    """[B, width] tensor of the rows (width: the longest by default), padded on the right with `value`."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype).reshape(
        len(rows), width
    )


def stack_padded(rows: Sequence[Tensor], width: int) -> Tensor:
    """[B, width] float32 of 1-d tensors, padded on the right with 0."""
    return torch.stack([torch.nn.functional.pad(row.float(), (0, width - row.shape[0])) for row in rows])


@dataclass
class RowLayout:
    """Where the sequences sit in the model's input and where each completion token is predicted.

    Unpacked: one right-padded row per sequence (causal attention hides the pads from every real
    token, position ids default to 0.. in every row: no mask needed). Packed: every sequence in
    one row, end to end, `position_ids` restarting at 0 for each; with `position_ids` and no
    attention mask, transformers (>= 4.53, `masking_utils.find_packed_sequence_indices`) masks
    sdpa/eager attention block-diagonally and flash-attention runs varlen (for one row only,
    `_is_packed_sequence`): each sequence sees exactly what it sees alone.
    """

    input_ids: Tensor  # [R, L]
    position_ids: Tensor | None  # [R, L] when packed
    mask: Tensor  # [B, T] bool: the completion tokens, T the longest completion
    rows: Tensor  # [N]: the row of each completion token (mask-true positions, row-major order)
    positions: Tensor  # [N]: the position in its row whose output predicts it
    targets: Tensor  # [N]: the token

    @classmethod
    def of(cls, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], packed: bool, device) -> RowLayout:
        if any(len(prompt) == 0 for prompt, _ in sequences):
            raise ValueError("every sequence needs at least one prompt token")
        prompt_lens = torch.tensor([len(prompt) for prompt, _ in sequences], dtype=torch.long)
        completion_lens = torch.tensor([len(completion) for _, completion in sequences], dtype=torch.long)
        tokens = [list(p) + list(c) for p, c in sequences]
        if packed:
            input_ids = torch.tensor([[t for row in tokens for t in row]], dtype=torch.long)
            position_ids = torch.cat([torch.arange(len(row)) for row in tokens])[None]
            row_of = torch.zeros(len(sequences), dtype=torch.long)
            start_of = torch.cumsum(prompt_lens + completion_lens, 0) - (prompt_lens + completion_lens)
        else:
            input_ids, position_ids = right_pad(tokens, 0, torch.long), None
            row_of, start_of = torch.arange(len(sequences)), torch.zeros(len(sequences), dtype=torch.long)
        targets = right_pad([c for _, c in sequences], 0, torch.long)
        mask = torch.arange(targets.shape[1])[None, :] < completion_lens[:, None]
        # The output at position j predicts token j+1: completion token t of sequence i is
        # predicted at start_i + prompt_len_i - 1 + t of its row.
        sample, step = mask.nonzero(as_tuple=True)
        return cls(
            input_ids=input_ids.to(device),
            position_ids=None if position_ids is None else position_ids.to(device),
            mask=mask.to(device),
            rows=row_of[sample].to(device),
            positions=(start_of[sample] + prompt_lens[sample] - 1 + step).to(device),
            targets=targets[mask].to(device),
        )

    def scatter(self, values: Tensor) -> Tensor:
        """[N] per-token values as [B, T], 0 at padding."""
        zeros = torch.zeros(self.mask.shape, dtype=torch.float32, device=values.device)
        return zeros.masked_scatter(self.mask, values.float())


def completion_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperature: float,
    chunk_tokens: int | None = None,
    packed: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass over (prompt_ids, completion_ids) pairs.

    Returns (logprobs [B, T], mask [B, T] bool, entropy [B, T]) for the completion tokens, with
    T the longest completion; logprobs keep the graph to `model`'s parameters when grad is
    enabled, entropy (of the tempered distribution, a metric) never does. Padding holds 0.
    `model` is anything that calls like a Hugging Face causal LM and has `.device`
    (a transformers model, a peft model, a DeepSpeed engine wrapping one). `packed`: all the
    sequences in one row (`RowLayout`); the results are those of the unpacked rows.

    With `chunk_tokens`, and a model whose LM head is a plain linear map (`chunkable_head`),
    the logits are never built: the backbone's hidden states at the completion positions go
    through `learner/token_logprobs.py`, `chunk_tokens` tokens at a time; otherwise the model's
    own logits, then an fp32 log_softmax over the vocabulary at the completion positions.
    """
    head = chunkable_head(model) if chunk_tokens else None
    layout = RowLayout.of(sequences, packed, head.weight.device if head is not None else model.device)
    inputs = dict(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False)
    if head is not None:
        from learner.token_logprobs import sampled_token_logprobs

        hidden = _causal_lm(model).get_decoder()(**inputs).last_hidden_state  # [R, L, H]
        logprobs, entropy = sampled_token_logprobs(
            hidden[layout.rows, layout.positions], head.weight, layout.targets, temperature, chunk_tokens
        )
        return layout.scatter(logprobs), layout.mask, layout.scatter(entropy.detach())
    # Only the logits from the earliest predicting position on are computed.
    length = layout.input_ids.shape[1]
    first = int(layout.positions.min()) if len(layout.positions) else length - 1
    logits = model(**inputs, logits_to_keep=length - first).logits
    all_logprobs = torch.log_softmax(logits[layout.rows, layout.positions - first].float() / temperature, -1)
    logprobs = all_logprobs.gather(-1, layout.targets[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(all_logprobs.exp() * all_logprobs).sum(-1)
    return layout.scatter(logprobs), layout.mask, layout.scatter(entropy)


# The attention implementations whose masks transformers builds from packed position ids.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_packed_attention(model: torch.nn.Module) -> None:
    """Raise unless `model` keeps the sequences of a packed row apart (`RowLayout`): an older
    transformers, or another attention, would let them attend to each other silently."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as e:
        raise ValueError("learner.pack_sequences needs transformers >= 4.53 (packed position ids)") from e
    attention = getattr(_causal_lm(model).config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"learner.pack_sequences: attention {attention!r} is not one of {PACKED_ATTENTION}")


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
