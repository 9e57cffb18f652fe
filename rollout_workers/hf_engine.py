"""Inference with plain Hugging Face transformers + peft: the engine that runs anywhere.

A hand-written sampling loop over the KV cache rather than `model.generate`, so that nothing
(generation_config defaults such as top_k=50, repetition penalties, ...) can change the
distribution we sample from, and so each token's behaviour log-prob comes from the very logits
it was sampled from.

No continuous batching here: `step()` runs every waiting request with the same settings as one
batch to completion (a step is a whole batch). The worker's interface is the same as vLLM's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.dtypes import resolve_dtype
from weight_sync.adapter import AdapterWeights
from weight_sync.config import LoraShape
from weight_sync.full_weights import FullWeights, base_parameters

from .engine_rules import check_adapter, eos_token_ids
from .interface import Completion, SamplingSettings


class HFEngine:
    name = "hf"

    def __init__(self, model_path: str | Path, dtype: str, lora: LoraShape):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)
        torch_dtype = getattr(torch, resolve_dtype(dtype, self.device.type))
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        # The learner's LoRA shape; a fresh adapter has B = 0, so until the first
        # load_adapter this is exactly the base model (policy version 0).
        self.lora = lora
        self.model = get_peft_model(base, LoraConfig(**lora.peft_kwargs())).to(self.device).eval()
        self.lora_shapes = {name: t.shape for name, t in get_peft_model_state_dict(self.model).items()}
        self.waiting: list[tuple[str, list[int], SamplingSettings]] = []

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingSettings) -> None:
        self.waiting.append((request_id, prompt_ids, sampling))

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[tuple[str, Completion]]:
        """Every waiting request sampled like the first one, as one batch seeded with its seed."""
        first = self.waiting[0][2]
        same = lambda s: (s.temperature, s.max_new_tokens) == (first.temperature, first.max_new_tokens)
        batch = [request for request in self.waiting if same(request[2])]
        self.waiting = [request for request in self.waiting if not same(request[2])]
        completions = self.generate([prompt for _, prompt, _ in batch], first)
        return [(request_id, completion) for (request_id, _, _), completion in zip(batch, completions)]

    def load_adapter(self, adapter: AdapterWeights) -> None:
        check_adapter(adapter, self.lora, self.lora_shapes)
        set_peft_model_state_dict(self.model, adapter.tensors)

    @torch.no_grad()
    def load_full_weights(self, weights: FullWeights) -> None:
        """Copy every weight in place; the LoRA is zeroed (full weights already contain it)."""
        params = base_parameters(self.model)
        weights.check({name: p.shape for name, p in params.items()})
        for name, tensor in weights.tensors.items():
            params[name].copy_(tensor)
        for name, param in self.model.named_parameters():
            if ".lora_B." in name:
                param.zero_()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        if not prompts:
            return []
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(sampling.seed)
        input_ids, attention_mask = self._left_pad(prompts)
        # Positions count real tokens only, so left padding does not shift them.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []

        # Logits of the last position only, selected by index: the slice logits_to_keep=1 makes
        # a non-contiguous bf16 lm_head input, for which torch 2.13 on CPU transiently allocates
        # gigabytes (5 GB for 100 prompts of 60 tokens) instead of the 10 MB of output.
        last_position = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=last_position,
        )
        for step in range(sampling.max_new_tokens):
            token, logprob = _sample(out.logits[:, -1].float(), sampling.temperature, generator)
            token = token.masked_fill(finished, self.pad_id)
            tokens.append(token)
            logprobs.append(logprob)
            finished |= torch.isin(token, eos)
            if finished.all() or step == sampling.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return self._completions(torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist())

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _completions(self, token_rows: list[list[int]], logprob_rows: list[list[float]]) -> list[Completion]:
        completions = []
        for ids, logprobs in zip(token_rows, logprob_rows):
            # Keep everything up to and including the first EOS: the learner must learn to stop.
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
            ids, logprobs = ids[:end], logprobs[:end]
            completions.append(
                Completion(
                    completion_ids=ids,
                    behaviour_logprobs=logprobs,
                    finish_reason="stop" if end is not None else "length",
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                )
            )
        return completions


def _sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / T), full vocabulary, and its log-prob under that
    distribution. T = 0 is greedy, reported with T = 1 log-probs (as vLLM does)."""
    if temperature == 0:
        token = logits.argmax(-1)
        logprobs = logits.log_softmax(-1)
    else:
        logprobs = (logits / temperature).log_softmax(-1)
        # Inverse-CDF sampling: one uniform per row. On CPU this is several times faster than
        # torch.multinomial or an exponential race, which draw a random number per vocab entry.
        cdf = logprobs.exp().cumsum(-1)
        uniform = torch.rand(len(logits), 1, generator=generator, device=logits.device)
        # right=True: a zero-probability token (flat CDF step) can never be picked.
        token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp(max=logits.shape[-1] - 1)
        token = token.squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
