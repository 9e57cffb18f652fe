"""Choosing an inference engine: vLLM where it is installed, else Hugging Face transformers."""

from __future__ import annotations

from .config import EngineSpec, RolloutConfig
from .interface import InferenceEngine


def make_engine(rollout: RolloutConfig, spec: EngineSpec) -> InferenceEngine:
    """`rollout.engine`: `auto` = vLLM when it can be imported, else the Hugging Face engine."""
    if rollout.engine not in ("auto", "vllm", "hf"):
        raise ValueError(f"unknown engine {rollout.engine!r}: expected auto, vllm or hf")
    if rollout.engine in ("auto", "vllm"):
        try:
            from .vllm_engine import VLLMEngine
        except ImportError:
            if rollout.engine == "vllm":
                raise
        else:
            return VLLMEngine(
                spec.model_path,
                spec.dtype,
                spec.lora,
                kv_cache_gib=rollout.vllm_kv_cache_gib,
                merge_adapter=rollout.vllm_merge_adapter,
                gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                max_model_len=spec.max_model_len,
            )
    from .hf_engine import HFEngine

    return HFEngine(spec.model_path, spec.dtype, spec.lora)
