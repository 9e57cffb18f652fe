"""Choosing an inference engine: vLLM where it is installed, else Hugging Face transformers."""

from __future__ import annotations

import dataclasses
import logging

from .config import EngineSpec, RolloutConfig
from .interface import InferenceEngine

log = logging.getLogger("rft.rollout")


def within_model_context(spec: EngineSpec) -> EngineSpec:
    """The spec with `max_model_len` capped at the model's own context (`max_position_embeddings`).
    A job's longest prompt + episode may ask for more than the model holds: vLLM refuses to start
    then, and the HF model would run past its position table. Capped, an episode that reaches the
    model's context ends there (`EpisodeLimits`) and a completion stops at it."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(spec.model_path), "max_position_embeddings", None)
    if context is None or spec.max_model_len <= context:
        return spec
    log.warning(
        "sequences of up to %d tokens were asked for; the model holds %d: capped at %d",
        spec.max_model_len,
        context,
        context,
    )
    return dataclasses.replace(spec, max_model_len=int(context))


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
