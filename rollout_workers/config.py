"""The rollout workers' config section (`rollout`), and what an engine needs from the rest of
the job (`EngineSpec`, which the job derives from its other sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import Section
from weight_sync.config import LoraShape


class EnvironmentSpec(Section):
    """A multi-turn environment (docs/agentic.md; rollout_workers/environments/), run sandboxed."""

    type: Literal["python", "tools", "agent"]
    path: str = Field(
        description="the .py file: a class (python), plain tool functions (tools) or an agent program's "
        "run(item, base_url) (agent)"
    )
    class_name: str | None = None  # python: the class (default Environment); agent: the function (run)
    options: dict[str, Any] | None = None  # python: Environment(**options); agent: run(..., **options)

    @model_validator(mode="after")
    def _python_only_fields(self) -> EnvironmentSpec:
        if self.type == "tools" and (self.class_name is not None or self.options is not None):
            raise ValueError(
                "class_name and options are for types python and agent; a tools file has no class"
            )
        return self


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
    # Multi-turn episodes (docs/agentic.md); None = single-turn, one completion per prompt.
    environment: EnvironmentSpec | None = None
    max_turns: int = Field(default=8, ge=1, description="model turns per episode")
    max_episode_tokens: int = Field(default=2048, ge=1, description="model + observation tokens")
    max_tool_output_tokens: int = Field(default=256, ge=1, description="per observation; cut beyond")
    environment_timeout_s: float = Field(default=10.0, gt=0, description="wall clock per reset/step")
    # observe: a failed call gives the model an error observation; end: it ends the episode.
    environment_errors: Literal["observe", "end"] = "observe"
    environment_cpu_s: int = Field(default=10, ge=1, description="CPU seconds per episode")
    environment_memory_mb: int = Field(default=1024, ge=64, description="address space per process")
    # Refuse to run environments without the sandbox's namespaces unless the user accepts it.
    environment_allow_weak_isolation: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """The model an engine serves: its directory and dtype, the LoRA shape the learner trains
    (what a synced adapter must have), and the longest prompt + completion it must hold."""

    model_path: str
    dtype: Literal["auto", "bfloat16", "float32"]  # auto: core.dtypes.resolve_dtype, per engine
    lora: LoraShape
    max_model_len: int
