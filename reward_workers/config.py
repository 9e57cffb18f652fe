"""The reward workers' config section (`reward`): the grader spec and the sandbox's limits."""

from __future__ import annotations

from pydantic import Field, model_validator

from core.config import Section
from reward_workers.grader_spec import CodeTestsGrader, GraderConfig, TritonKernelGrader, walk


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
        test_time = sum(
            spec.timeout_s
            for _, spec in walk(self.grader)
            if isinstance(spec, (CodeTestsGrader, TritonKernelGrader))
        )
        if test_time >= self.timeout_s:
            raise ValueError(
                f"the code_tests graders' timeout_s ({test_time:g} s in all) must be below "
                f"reward.timeout_s ({self.timeout_s:g} s)"
            )
        return self
