"""A job's stages (`stages:` in its config) as a schedule over its global steps.

Steps are numbered across the whole job; stage k owns the steps after those of the stages
before it. So the stage of a step is a function of the step alone: a checkpoint needs no stage
of its own, and `--resume` lands in the stage (and step) where the run stopped. A job without
`stages` is one grpo stage of `steps`. Each stage starts from the weights the one before left:
the learner is the same, and every step publishes its version to the rollout workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from learner.interface import TrainBatch
from services.config import JobConfig, StageConfig
from services.orchestrator.batch import BuiltBatch, data_sample
from services.orchestrator.demonstrations import Demonstration
from services.orchestrator.records import StepRecord
from services.orchestrator.selection import StepPrompts


@dataclass(frozen=True)
class Stage:
    index: int  # 0-based, in the config's order
    config: StageConfig
    first_step: int  # its steps: first_step .. first_step + config.steps - 1 (0-based, global)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.kind})"


class StagePlan:
    def __init__(self, cfg: JobConfig):
        configs = cfg.stages or [StageConfig(kind="grpo", steps=cfg.steps)]
        firsts = [sum(c.steps for c in configs[:index]) for index in range(len(configs))]
        self.stages = [
            Stage(index, config, first) for index, (config, first) in enumerate(zip(configs, firsts))
        ]

    def of(self, step: int) -> Stage:
        """The stage that owns `step` (0-based)."""
        return next(s for s in reversed(self.stages) if step >= s.first_step)

    def generates(self, step: int) -> bool:
        """Whether the step trains on rollouts (its prompts go to the rollout workers)."""
        return self.of(step).config.generates

    def submit_through(self, step: int, max_staleness: int) -> int:
        """The last step whose prompts may be out while `step` trains: max_staleness ahead in a
        stage that generates; none ahead in one that does not, so the next stage's first rollouts
        come from the weights it leaves (not from the start of the stage before)."""
        return step + max_staleness if self.generates(step) else step


def offline_step(step: int, policy_version: int, batch: TrainBatch) -> StepRecord:
    """The record of a step that trains on the stage's own data: no rollouts, nothing graded."""
    record = StepRecord(
        step, policy_version, [], 0, StepPrompts(), generation_seconds=0.0, reward_seconds=0.0
    )
    record.built = BuiltBatch(batch, zero_signal_groups=0, signal_groups=0, stale_dropped=0)
    return record


def stage_rows(stage: Stage, step: int, count: int, seed: int) -> list[tuple[int, str]]:
    """Which of the stage's `count` rows (demonstrations, pairs) the step takes, `batch_size` of
    them from an order shuffled per pass (seeded by the job's seed, the stage and the pass), each
    with a tag naming the stage and the pass: a row is in a pass once, so `<row id>@<tag>` is
    unique. A function of the step, so a resumed or replayed step takes the same ones."""
    size = stage.config.batch_size
    start = (step - stage.first_step) * size
    orders: dict[int, list[int]] = {}
    rows = []
    for position in range(start, start + size):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = list(range(count))
            random.Random(f"{seed}/{stage.index}/{epoch}").shuffle(orders[epoch])
        rows.append((orders[epoch][offset], f"{stage.index + 1}.{epoch}"))
    return rows


def demonstration_batch(
    stage: Stage, step: int, demonstrations: list[Demonstration], seed: int, policy_version: int
) -> TrainBatch:
    """An sft step's demonstrations, `batch_size` of them (`stage_rows`)."""
    samples = [
        data_sample(
            f"{demonstrations[row].id}@{tag}",
            demonstrations[row].prompt_ids,
            demonstrations[row].completion_ids,
            policy_version,
        )
        for row, tag in stage_rows(stage, step, len(demonstrations), seed)
    ]
    return TrainBatch(step, samples, temperature=1.0, objective="sft")
