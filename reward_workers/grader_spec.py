"""Grader specs: the `reward.grader` part of the job config, one pydantic model per grader type,
told apart by `type` (extra fields are errors). A superset of OpenAI's reinforcement
fine-tuning grader JSON: string_check, text_similarity, python (with `source` as code),
score_model (= llm_judge) and multi (with `calculate_output`) validate as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from core.config import ConfigError
from reward_workers.graders import formula

SAMPLE_TEXT = "{{sample.output_text}}"
GROUND_TRUTH = "{{item.reward_model.ground_truth}}"
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
OPENAI_METRICS_NOT_SUPPORTED = ("gleu", "meteor", "cosine")


class GraderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str = "grader"


class StringCheckGrader(GraderSpec):
    type: Literal["string_check"]
    input: str = SAMPLE_TEXT
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


def _compiles(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
    return pattern


class RegexGrader(GraderSpec):
    type: Literal["regex"]
    input: str = SAMPLE_TEXT
    pattern: str
    mode: Literal["search", "fullmatch", "extract"] = "search"
    reference: str = GROUND_TRUTH  # extract mode: what the extracted group must equal
    ignore_case: bool = False
    _check_pattern = field_validator("pattern")(_compiles)


class NumericGrader(GraderSpec):
    type: Literal["numeric"]
    input: str = SAMPLE_TEXT
    reference: str = GROUND_TRUTH
    extract: Literal["last_number", "first_number", "pattern", "whole"] = "last_number"
    pattern: str | None = None  # extract: pattern; group 1 (or the match) holds the number
    abs_tol: float = Field(default=1e-6, ge=0)
    rel_tol: float = Field(default=0.0, ge=0)
    _check_pattern = field_validator("pattern")(_compiles)

    @model_validator(mode="after")
    def _pattern_when_needed(self) -> NumericGrader:
        if (self.extract == "pattern") != (self.pattern is not None):
            raise ValueError("pattern is required with extract: pattern, and only then")
        return self


class JsonMatchGrader(GraderSpec):
    type: Literal["json_match"]
    input: str = SAMPLE_TEXT
    reference: str = GROUND_TRUTH
    name_weight: float = Field(
        default=0.5, ge=0, le=1, description="tool calls: credit for the right function"
    )


class TextSimilarityGrader(GraderSpec):
    type: Literal["text_similarity"]
    input: str = SAMPLE_TEXT
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = None

    @field_validator("evaluation_metric")
    @classmethod
    def _supported(cls, metric: str) -> str:
        if metric not in SIMILARITY_METRICS:
            kind = (
                "is an OpenAI metric not supported here"
                if metric in OPENAI_METRICS_NOT_SUPPORTED
                else "is unknown"
            )
            raise ValueError(f"{metric!r} {kind}; use one of {', '.join(SIMILARITY_METRICS)}")
        return metric


class PythonGrader(GraderSpec):
    type: Literal["python"] = "python"
    # A path to a .py file (relative to the config file), or the code itself (OpenAI's form).
    source: str = Field(description="path of a .py file defining grade(sample, item), or its code")
    image_tag: str | None = None  # OpenAI's runtime version; accepted and ignored

    @property
    def is_inline(self) -> bool:
        return "\n" in self.source or not self.source.endswith(".py")


class CodeTestsGrader(GraderSpec):
    type: Literal["code_tests"]
    code: str = SAMPLE_TEXT
    tests: str = "{{item.tests}}"
    timeout_s: float = Field(default=5.0, gt=0, description="for all tests of one sample")


class TritonKernelGrader(GraderSpec):
    """A model-written Triton kernel vs the item's PyTorch reference (graders/triton_kernel.py)."""

    type: Literal["triton_kernel"]
    code: str = SAMPLE_TEXT
    function: str = "{{item.function}}"  # the name the model's function must have
    reference: str = "{{item.reference}}"  # Python source defining that function with torch
    cases: str = "{{item.cases}}"  # [{"seed", "args": [number | {"shape", "dtype", "low", "high"}]}]
    atol: float = Field(default=1e-4, ge=0)
    rtol: float = Field(default=1e-4, ge=0)
    device: Literal["auto", "cpu", "cuda"] = (
        "auto"  # auto: a GPU when the harness sees one, else the interpreter
    )
    timeout_s: float = Field(
        default=30.0, gt=0, description="for all cases of one sample, interpreter start included"
    )
    format_weight: float = Field(default=0.1, ge=0, le=1)
    compile_weight: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _weights_leave_room(self) -> TritonKernelGrader:
        if self.format_weight + self.compile_weight > 1:
            raise ValueError(
                "format_weight + compile_weight must be at most 1 (the rest is for correct cases)"
            )
        return self


class SqlGrader(GraderSpec):
    type: Literal["sql"]
    query: str = SAMPLE_TEXT
    database: str = "{{item.database}}"
    expected: str = "{{item.expected}}"  # rows, or a reference query
    order_matters: bool = False  # an item's own "order_matters" wins


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None


JUDGE_SAMPLING_PARAMS = {
    "temperature",
    "top_p",
    "seed",
    "max_completions_tokens",
    "max_tokens",
    "reasoning_effort",
}


class LlmJudgeGrader(GraderSpec):
    """A model scores the sample (graders/llm_judge.py): called in the reward worker's process,
    not in the sandbox. OpenAI's score_model JSON validates as it is (add base_url to run it)."""

    type: Literal["llm_judge", "score_model"]
    model: str = Field(description="served model name with base_url; else a local HF model dir or 'default'")
    base_url: str | None = None  # an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key, if any
    input: list[ChatMessage] | None = Field(default=None, min_length=1)
    rubric: str | None = None  # instead of input: rubric + item_text + the sample, in a built-in prompt
    item_text: str = "{{item.prompt}}"
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: dict[str, Any] | None = None
    pass_threshold: float | None = None
    timeout_s: float = Field(default=60.0, gt=0, description="per endpoint request")

    @model_validator(mode="after")
    def _checks(self) -> LlmJudgeGrader:
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range {list(self.range)} must be [low, high] with low < high")
        if (self.input is None) == (self.rubric is None):
            raise ValueError("give input (the judge's messages) or rubric, exactly one")
        unknown = sorted(set(self.sampling_params or {}) - JUDGE_SAMPLING_PARAMS)
        if unknown:
            raise ValueError(
                f"sampling_params: unknown keys {unknown}; known: {sorted(JUDGE_SAMPLING_PARAMS)}"
            )
        return self


class MultiGrader(GraderSpec):
    type: Literal["multi"]
    graders: dict[str, GraderConfig] = Field(min_length=1)
    calculate_output: str | None = None
    weights: dict[str, float] | None = None

    @model_validator(mode="after")
    def _combination(self) -> MultiGrader:
        for key in self.graders:
            if not key.isidentifier():
                raise ValueError(f"sub-grader name {key!r} must be an identifier (it is a formula variable)")
        if self.calculate_output is not None and self.weights is not None:
            raise ValueError("give calculate_output or weights, not both")
        if self.weights is not None:
            if set(self.weights) != set(self.graders):
                raise ValueError(f"weights must name exactly the sub-graders {sorted(self.graders)}")
            if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
                raise ValueError("weights must be non-negative with a positive sum")
        if self.calculate_output is not None:
            try:
                formula.parse(self.calculate_output, set(self.graders))
            except formula.FormulaError as e:
                raise ValueError(f"calculate_output {self.calculate_output!r}: {e}") from None
        return self


def _python_by_default(value: Any) -> Any:
    """Configs written before the library have no `type`: they are python graders."""
    if isinstance(value, dict) and "type" not in value:
        return {**value, "type": "python"}
    return value


GraderConfig = Annotated[
    Union[
        StringCheckGrader,
        RegexGrader,
        NumericGrader,
        JsonMatchGrader,
        TextSimilarityGrader,
        PythonGrader,
        CodeTestsGrader,
        SqlGrader,
        TritonKernelGrader,
        LlmJudgeGrader,
        MultiGrader,
    ],
    Field(discriminator="type"),
    BeforeValidator(_python_by_default),
]
MultiGrader.model_rebuild()


def walk(grader, where: str = "reward.grader"):
    """(config path, grader) for the grader and every sub-grader, depth first."""
    yield where, grader
    if isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            yield from walk(sub, f"{where}.graders.{key}")


def resolve_source_paths(raw: Any, base_dir: Path) -> None:
    """In a raw (unvalidated) grader spec, make relative python `source` file paths absolute:
    relative to base_dir (the config file's folder) when that file exists there, else to the
    working directory when it exists there (a `-o` override); the sandbox runs elsewhere."""
    if not isinstance(raw, dict):
        return
    source = raw.get("source")
    if raw.get("type", "python") == "python" and isinstance(source, str) and "\n" not in source:
        path = Path(source).expanduser()
        if not path.is_absolute():
            if (base_dir / path).exists():
                raw["source"] = str((base_dir / path).resolve())
            elif path.is_file():
                raw["source"] = str(path.resolve())
    if raw.get("type") == "multi" and isinstance(raw.get("graders"), dict):
        for sub in raw["graders"].values():
            resolve_source_paths(sub, base_dir)


def check_grader(grader: GraderConfig, where: str = "reward.grader") -> None:
    """Refuse, at job start, a grader that validates but cannot run: a missing python file.
    Raises ConfigError naming the field."""
    for path, spec in walk(grader, where):
        if isinstance(spec, PythonGrader) and not spec.is_inline and not Path(spec.source).is_file():
            raise ConfigError(f"{path}.source: {spec.source} not found")
