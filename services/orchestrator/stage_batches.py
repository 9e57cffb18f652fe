"""What a step trains on, by its stage's kind (the stage of a step: services/orchestrator/stages.py).

A stage that generates turns the step's scored rollouts into a batch of its objective:
  grpo           group-normalised advantages (batch.py)
  rejection_sft  the rollouts that pass, as sft data (rejection.py)
  dpo (online)   each group's best and worst as a pair, against the step's start (preferences.py)
  distill        the teacher's log-probs minus the behaviour's as token advantages (distillation.py)
A stage with data of its own takes the step's share of it, no rollouts:
  sft            demonstrations (stages.py)
  dpo            pairs from a file, against the stage's start (preferences.py)
"""

from __future__ import annotations

from reward_workers.interface import ScoredRollout
from services.config import JobConfig
from services.orchestrator.batch import BuiltBatch, build_batch
from services.orchestrator.distillation import actor_scoring, distillation_batch
from services.orchestrator.preferences import StageReference, online_pairs_batch
from services.orchestrator.records import StepRecord
from services.orchestrator.rejection import rejection_batch
from services.orchestrator.setup import Actors, JobInputs
from services.orchestrator.stages import Stage, demonstration_batch, offline_step


class StageBatches:
    def __init__(self, cfg: JobConfig, inputs: JobInputs, actors: Actors):
        self.cfg, self.inputs, self.actors = cfg, inputs, actors
        self.references = {  # offline dpo stages: their pairs' log-probs at the stage's start
            index: StageReference(cfg.run_dir / "stages" / f"{index + 1}-dpo-reference.json", pairs)
            for index, pairs in inputs.preference_pairs.items()
        }

    def of_rollouts(
        self, stage: Stage, step: int, scored: list[ScoredRollout], policy_version: int
    ) -> BuiltBatch:
        group_size = self.cfg.rollout.samples_per_prompt
        if stage.kind == "rejection_sft":
            return rejection_batch(step, scored, group_size, stage.config.min_reward)
        if stage.kind == "dpo":
            return online_pairs_batch(stage, step, scored, group_size, self.actors.learner.score_sequences)
        if stage.kind == "distill":
            teacher = actor_scoring(self.actors.teachers[stage.index])
            prompt_ids = self.inputs.teachers[stage.index].prompt_ids
            return distillation_batch(self.cfg, step, scored, policy_version, teacher, prompt_ids)
        return build_batch(self.cfg, step, scored, policy_version)

    def of_stage_data(self, stage: Stage, step: int, policy_version: int) -> StepRecord:
        if stage.kind == "sft":
            demonstrations = self.inputs.demonstrations[stage.index]
            batch = demonstration_batch(stage, step, demonstrations, self.cfg.seed, policy_version)
        else:
            reference = self.references[stage.index]
            reference.take(step == stage.first_step, self.actors.learner.score_sequences)
            batch = reference.batch(stage, step, self.cfg.seed, policy_version)
        return offline_step(step, policy_version, batch)
