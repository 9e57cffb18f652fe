"""Packed rows (learner/logprobs.py `RowLayout`, learner.pack_sequences): several sequences end to
end in one row, position ids restarting per sequence, give each sequence's completion log-probs,
entropy and gradients exactly as its own right-padded row does, on both log-prob paths, with
sdpa and eager attention, through peft's LoRA. A tiny Llama built here (the SmolLM2 family)."""

from __future__ import annotations

import re

import pytest
import torch

from learner.logprobs import RowLayout, check_packed_attention, completion_logprobs

VOCAB = 211
# (prompt, completion) lengths: a one-token prompt, an empty completion, a long one
LENGTHS = [(5, 7), (1, 4), (9, 0), (3, 11), (6, 2)]


def tiny_llama(attention: str, lora: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # LoRA's B starts at zero; make the adapter act
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
    return model


def sequences(lengths=LENGTHS, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    return [(draw(p), draw(c)) for p, c in lengths]


def test_layout_of_a_packed_row():
    layout = RowLayout.of([([1, 2], [3, 4, 5]), ([6], [7])], packed=True, device="cpu")
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # completion tokens 3, 4, 5 are predicted at 1, 2, 3; token 7 (after 6 at 5) at 5
    assert layout.rows.tolist() == [0, 0, 0, 0] and layout.positions.tolist() == [1, 2, 3, 5]
    assert layout.targets.tolist() == [3, 4, 5, 7]
    assert layout.mask.tolist() == [[True, True, True], [True, False, False]]
    unpacked = RowLayout.of([([1, 2], [3, 4, 5]), ([6], [7])], packed=False, device="cpu")
    assert unpacked.position_ids is None and unpacked.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert unpacked.rows.tolist() == [0, 0, 0, 1] and unpacked.positions.tolist() == [1, 2, 3, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_tokens", [None, 5], ids=["full-logits", "chunked"])
def test_packed_logprobs_entropy_and_gradients_equal_unpacked(attention, chunk_tokens):
    model = tiny_llama(attention, lora=True)
    pairs = sequences()
    trained = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for packed in (False, True):
        logprobs, mask, entropy = completion_logprobs(model, pairs, 0.7, chunk_tokens, packed=packed)
        upstream = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)  # per-token loss weights
        grads = torch.autograd.grad((logprobs * upstream).sum(), trained)
        results[packed] = logprobs.detach(), mask, entropy, grads
    (lp, mask, ent, grads), (packed_lp, packed_mask, packed_ent, packed_grads) = results[False], results[True]
    assert torch.equal(mask, packed_mask) and mask.sum() == sum(c for _, c in LENGTHS)
    assert (lp[mask] < 0).all() and (ent[mask] > 0).all() and lp[~mask].abs().max() == 0
    torch.testing.assert_close(packed_lp, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_ent, ent, atol=1e-5, rtol=0)
    assert max(g.abs().max() for g in grads) > 1e-3  # a real signal
    for grad, packed_grad in zip(grads, packed_grads):
        torch.testing.assert_close(packed_grad, grad, atol=1e-5, rtol=1e-4)


def test_packed_equals_each_sequence_alone_and_restarting_positions_matter():
    """Against each sequence through the model on its own; and the same row with positions
    0..L-1 (no restart: no block-diagonal mask) is far off, so the check can fail."""
    model = tiny_llama("sdpa")
    pairs = sequences()
    packed, mask, _ = completion_logprobs(model, pairs, 1.0, packed=True)
    for i, (prompt, completion) in enumerate(pairs):
        alone, _, _ = completion_logprobs(model, [(prompt, completion)], 1.0)
        torch.testing.assert_close(packed[i, : len(completion)], alone[0], atol=1e-5, rtol=0)
    layout = RowLayout.of(pairs, packed=True, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=layout.input_ids, use_cache=False).logits[0, layout.positions]
    leaked = torch.log_softmax(logits, -1).gather(-1, layout.targets[:, None]).squeeze(-1)
    assert (leaked - packed[mask]).abs().max() > 1e-2


def test_packing_is_refused_where_attention_would_leak_across_sequences():
    model = tiny_llama("sdpa")
    check_packed_attention(model)  # sdpa builds the block-diagonal mask
    model.config._attn_implementation = "paged|sdpa"  # transformers' paged attention: no such mask
    with pytest.raises(ValueError, match=re.escape("attention 'paged|sdpa' is not one of")):
        check_packed_attention(model)
