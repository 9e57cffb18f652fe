"""The rollout workers' config section (`rollout`), and what an engine needs from the rest of
the job (`EngineSpec`, which the job derives from its other sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from core.config import Section
from weight_sync.config import LoraShape


class RolloutConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = "auto"  # auto = vLLM when installed, else HF
    num_workers: int = Field(default=1, ge=1)
    samples_per_prompt: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, ge=1)
    vllm_kv_cache_gib: int = Field(default=1, ge=1)
    # vLLM: fold each synced LoRA into the served weights (reloaded in place) instead of serving
    # it as a LoRA request. Same policy; on CPU vLLM's LoRA path is ~5x slower than the plain one.
    vllm_merge_adapter: bool = True
    num_cpus_per_worker: float = Field(default=0, ge=0)
    num_gpus_per_worker: float = Field(default=0, ge=0)
    # Ray custom resources each rollout worker asks for (e.g. {"rollout_node": 1}): the way to pin
    # rollout workers to nodes started with `ray start --resources=...`, apart from the learner's.
    resources: dict[str, float] = {}
    # vLLM on GPU: the share of the device's memory this engine may claim; vLLM refuses to start
    # when less than this share is free. Lower it when the learner shares the GPU (fractional
    # num_gpus_per_worker). Not used on CPU, where vllm_kv_cache_gib sizes the cache.
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # Multi-turn episodes (docs/agentic.md): the environment spec ({type: python|tools, path, ...});
    # None = one completion per prompt.
    environment: dict | None = None
    max_turns: int = Field(default=8, ge=1)  # model turns per episode
    max_episode_tokens: int = Field(default=2048, ge=1)  # model + observation tokens after the prompt
    max_tool_output_tokens: int = Field(default=256, ge=1)  # per observation message, cut beyond


@dataclass(frozen=True)
class EngineSpec:
    """The model an engine serves: its directory and dtype, the LoRA shape the learner trains
    (what a synced adapter must have), and the longest prompt + completion it must hold."""

    model_path: str
    dtype: Literal["bfloat16", "float32"]
    lora: LoraShape
    max_model_len: int
