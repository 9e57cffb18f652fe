"""The job driver: the only place that knows the schedule.

`Orchestrator.run` is the main loop; each step is
  submit ahead   scale the rollout fleet, then give it the prompts of the steps up to
                 s + max_staleness that are not generating yet (`GenerationRequest`s)
  collect        each prompt's group as it comes off a rollout worker (`Rollout`s), graded at
                 once by the reward pool (`ScoredRollout`s); topped up with more prompts while
                 dynamic sampling wants more groups with signal; appended to the scored-rollout stream
  build batch    the step's stage makes its `TrainBatch` (stage_batches.py): grpo's group-normalised
                 advantages, stale rollouts left out; or rejection sft, dpo pairs, distillation;
                 or, for a stage with data of its own (sft, offline dpo), that data instead of rollouts
  train          one learner step (`StepStats`); too many non-finite steps in a row stop the job
  publish        the new version over the weight-sync channel to every rollout worker
  record         driver state, samples.jsonl, metrics (assembled in `records.step_metrics`),
                 held-out evaluation and checkpoints when due
The run ends after step `cfg.steps`, or earlier after the step when the wall-clock budget
(`max_minutes`, budget.py) has no room for another: that step is evaluated and checkpointed
as a last one, and the steps submitted ahead are left untrained (a resume generates them again).
A learner rank that dies or hangs fails the step (`LearnerFailedError`); the learner group is
restarted and the run rolled back to its last checkpoint, replaying the steps after it from the
scored-rollout stream (`recover_learner`).
The components never call the driver; it wires them up in `run_job` and drives them from here.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

from learner.group import LearnerFailedError
from learner.interface import StepStats
from reward_workers.interface import ScoredRollout
from services.config import JobConfig, dump_config
from services.jobs.control import JobControl, RegistryControl
from services.jobs.registry import JobRegistry, open_registry
from services.orchestrator.batch import group_requests, step_sampling
from services.orchestrator.budget import WallClockBudget
from services.orchestrator.checkpoints import (
    DriverState,
    check_resumable,
    restore,
    roll_back,
    save_checkpoint,
)
from services.orchestrator.evaluation import (
    HeldoutEvaluator,
    format_summary,
    heldout_metrics,
    heldout_sets_metrics,
)
from services.orchestrator.metrics import RunMetrics
from services.orchestrator.progress import StepProgress
from services.orchestrator.records import StepRecord, step_metrics, write_samples
from services.orchestrator.rollout_stream import ScoredRolloutStream
from services.orchestrator.selection import PromptSource
from services.orchestrator.setup import Actors, JobInputs, start_actors
from services.orchestrator.stage_batches import StageBatches
from services.orchestrator.stages import StagePlan
from weight_sync.channel import SyncResult

log = logging.getLogger("rft.driver")


class TrainingDivergedError(RuntimeError):
    """Too many learner steps in a row were skipped for non-finite numbers."""


def run_job(
    cfg: JobConfig, inputs: JobInputs, resume: bool = False, control: JobControl | None = None
) -> dict:
    """Run (or with `resume`, continue) the job; returns the summary also written to summary.json."""
    budget = WallClockBudget(cfg.max_minutes, started_at=time.perf_counter())
    if resume:
        check_resumable(cfg.run_dir, cfg.learner.num_ranks)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
    registry = open_registry(cfg.run_root, cfg.cluster.redis_url)
    registry.register(cfg.name, dump_config(cfg), cfg.run_dir)
    stream = ScoredRolloutStream(registry.redis, cfg.name)
    if not resume:
        stream.clear()
    with registry.tracking(cfg.name):
        actors = start_actors(cfg, inputs)
        metrics = RunMetrics(cfg.name, cfg.run_dir, cfg.metrics.host, cfg.metrics.port)
        print(f"metrics: http://{metrics.address}/metrics   run dir: {cfg.run_dir}", flush=True)
        try:
            control = control or RegistryControl(registry, cfg.name)
            orchestrator = Orchestrator(cfg, inputs, actors, metrics, stream, registry, control, budget)
            return orchestrator.run(resume)
        finally:
            metrics.close()
            actors.shutdown()


class Orchestrator:
    def __init__(
        self,
        cfg: JobConfig,
        inputs: JobInputs,
        actors: Actors,
        metrics: RunMetrics,
        stream: ScoredRolloutStream,
        registry: JobRegistry,
        control: JobControl,
        budget: WallClockBudget,
    ):
        self.cfg, self.inputs, self.actors, self.metrics = cfg, inputs, actors, metrics
        self.stream, self.registry, self.control = stream, registry, control
        self.state = DriverState()
        self.backlog: dict[int, list] = {}  # step -> its scored rollouts, from the stream (a resumed run)
        self.prompts = PromptSource(cfg, inputs.train_items)  # the data order, per step
        self.submitted = -1  # the last step whose prompts were taken
        self.submitted_at: dict[int, float] = {}  # step -> when its prompts were submitted
        self.skipped_in_a_row = 0
        self.replaced_before = self.reissued_before = 0
        self.last_heldout: dict[str, float] = {}
        self.last_heldout_sets: dict[str, dict] = {}
        self.progress: StepProgress | None = None  # the terminal's bar, while `run` runs
        self.evaluator = HeldoutEvaluator(cfg, inputs, actors)
        self.budget = budget
        self.last_step = cfg.steps  # earlier when the budget runs out
        self.plan = StagePlan(cfg)
        self.batches = StageBatches(cfg, inputs, actors)  # what a step trains on, by its stage
        self.resumed_at: int | None = None  # the step a resumed run went on from

    def run(self, resume: bool) -> dict:
        """The main loop: one learner step (and one policy version, unless skipped) per iteration.
        A learner rank that fails rolls the run back to its last checkpoint (`recover_learner`)."""
        self.start(resume)
        self.budget.steps_begin()
        with StepProgress(self.cfg.steps, self.state.step) as self.progress:
            while True:
                try:
                    if self.finished:
                        return self.finish()
                    self.step(self.state.step)
                except LearnerFailedError as failure:
                    self.recover_learner(failure)

    def step(self, step: int) -> None:
        self.announce_stage(step)
        for ahead in self.unsubmitted_steps(
            through=self.plan.submit_through(step, self.cfg.sync.max_staleness)
        ):
            self.scale_fleet()  # `rft scale` takes effect before a step's prompts go out
            self.submit(ahead)
        if self.plan.generates(step):
            record = self.collect_and_grade(step)
            record.built = self.batches.of_rollouts(
                self.plan.of(step), step, record.scored, self.state.policy_version
            )
        else:
            record = self.batches.of_stage_data(self.plan.of(step), step, self.state.policy_version)
        record.stats = self.train(record)
        record.sync = self.publish(record.stats)
        if not self.budget.step_ended():
            self.last_step = step + 1  # this one: evaluated and checkpointed as the run's end
        self.record(record)
        self.checkpoint_if_due()

    # ---- the steps ------------------------------------------------------------------------

    def start(self, resume: bool) -> None:
        """A fresh run evaluates the base model; a resumed one restores its last checkpoint and
        takes the scored rollouts of steps after it (generated, not trained) from the stream."""
        if resume:
            self.state = restore(self.cfg.run_dir, self.actors.learner)
            self.resumed_at = self.state.step
            if self.state.policy_version > 0:
                self.actors.rollouts.publish(self.state.policy_version, self.export())
        elif self.cfg.eval.at_start:
            self.evaluate_base()
        self.take_backlog()
        self.prompts.resume(self.state)
        self.submitted = self.state.step - 1

    def evaluate_base(self) -> None:
        """The base model on data.heldout and on every eval.extra_heldout set (one step-0 record)."""
        if self.inputs.heldout_items:
            self.state.base_heldout = self.evaluator.evaluate()
            print(f"held-out before training: {format_summary(self.state.base_heldout)}", flush=True)
        self.state.base_heldout_sets = self.evaluator.extra_sets(when="before training")
        values = heldout_metrics(self.state.base_heldout) if self.state.base_heldout else {}
        if values or self.state.base_heldout_sets:
            self.metrics.record(0, values | heldout_sets_metrics(self.state.base_heldout_sets))

    def take_backlog(self) -> None:
        """The scored rollouts in the stream of steps not trained yet (as of the last checkpoint)."""
        self.backlog = {
            step: scored for step, scored in self.stream.unacknowledged().items() if step >= self.state.step
        }
        if self.backlog:
            log.info("taking the scored rollouts of steps %s from the stream", sorted(self.backlog))

    def unsubmitted_steps(self, through: int) -> range:
        """Steps up to `through` whose prompts are not out yet. Called before training step s
        with s + max_staleness: rollouts of those steps start from the weights served now
        (version s, or older only when steps were skipped), so they are at most max_staleness
        versions old when trained -- and the workers always have the next steps' prompts."""
        return range(self.submitted + 1, min(through, self.cfg.steps - 1) + 1)

    def announce_stage(self, step: int) -> None:
        """A job with stages says where each begins (and where a resumed run goes on)."""
        stage = self.plan.of(step)
        if self.cfg.stages and (step == stage.first_step or step == self.resumed_at):
            last = stage.first_step + stage.config.steps
            print(f"{stage.label}: steps {stage.first_step + 1}-{last}, from step {step + 1}", flush=True)

    def scale_fleet(self) -> None:
        desired = self.control.desired_rollout_workers()
        if desired is not None and desired != len(self.actors.rollouts.workers):
            self.actors.rollouts.resize(desired)

    def submit(self, step: int) -> None:
        if not self.plan.generates(step):  # an sft step: nothing to generate
            self.submitted = step
            return
        items = self.prompts.for_step(step).items  # taken from the data order either way
        if step not in self.backlog:
            requests = group_requests(self.cfg, self.inputs, items)
            self.actors.rollouts.submit(step, requests, step_sampling(self.cfg, step))
        self.submitted, self.submitted_at[step] = step, time.perf_counter()

    def collect_and_grade(self, step: int) -> StepRecord:
        """The step's scored rollouts: replayed from the stream, or graded group by group as the
        rollout workers finish them and topped up (then appended to the stream before anything
        trains on them)."""
        scored = self.backlog.pop(step, None)
        replayed = len(scored or [])
        last_group_at = time.perf_counter()
        if scored is None:
            scored, last_group_at = self.top_up(step, *self.grade_as_generated(step))
            self.stream.append(step, scored)
        return StepRecord(
            step,
            self.state.policy_version,
            scored,
            replayed,
            self.prompts.complete(step, scored),
            # A step replayed after a learner restart was submitted (and its time taken) before.
            generation_seconds=last_group_at - self.submitted_at.pop(step, last_group_at),
            reward_seconds=time.perf_counter() - last_group_at,
        )

    def grade_as_generated(self, tag) -> tuple[list[ScoredRollout], float]:
        """The groups submitted under `tag`, each graded as it comes off a worker; and when the
        last one came."""
        groups = self.actors.rollouts.stream(tag)
        scored = self.actors.reward_pool.score_shares(groups, self.inputs.items_by_id)
        return scored, self.actors.rollouts.ended_at.pop(tag)

    def top_up(
        self, step: int, scored: list[ScoredRollout], last_group_at: float
    ) -> tuple[list[ScoredRollout], float]:
        """Dynamic sampling (algorithm.min_signal_groups): while the step has too few groups with
        signal, more of its prompts from the data order, in rounds, at most
        algorithm.max_extra_prompts in all. They generate on the version served now, so they are
        the batch's freshest rollouts and max_staleness holds."""
        for round_ in itertools.count(1):
            added = self.prompts.take_extra(step, scored)
            if not added:
                return scored, last_group_at
            items = self.prompts.steps[step].items
            requests = group_requests(self.cfg, self.inputs, items, first=len(items) - added)
            self.actors.rollouts.submit((step, round_), requests, step_sampling(self.cfg, step))
            more, last_group_at = self.grade_as_generated((step, round_))
            scored = scored + more

    def train(self, record: StepRecord) -> StepStats | None:
        """One learner step on the batch (none when it is empty)."""
        if not record.built.batch.samples:
            return None
        record.built.batch.learning_rate = self.plan.of(record.step).config.learning_rate
        stats = self.actors.learner.train_step(record.built.batch)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if stats.skipped else 0
        limit = self.cfg.learner.max_consecutive_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise TrainingDivergedError(
                f"steps {record.step - self.skipped_in_a_row + 2}-{record.step + 1}: {self.skipped_in_a_row} "
                "learner steps in a row had a non-finite loss or gradient "
                f"(learner.max_consecutive_skipped_steps={limit}); stopping. The weights of policy version "
                f"{self.state.policy_version} are unchanged; lower learner.learning_rate or check the "
                "rewards, then rft run --resume from the last checkpoint."
            )
        return stats

    def publish(self, stats: StepStats | None) -> SyncResult | None:
        """Send a new version to every rollout worker (and wait until each serves it). After a
        learner restart, the versions a replay trains again are not sent: the workers serve them
        already (the replay retrains the same batches in the same order)."""
        if stats is None or stats.policy_version <= self.state.policy_version:
            return None
        self.state.policy_version = stats.policy_version
        if stats.policy_version <= self.actors.channel.version:
            return None
        return self.actors.rollouts.publish(stats.policy_version, self.export())

    def record(self, record: StepRecord) -> None:
        """The step is done: driver state, samples.jsonl, evaluation when due, metrics, registry."""
        rollouts = self.actors.rollouts
        record.rollout_workers = len(rollouts.workers)
        record.workers_replaced = rollouts.workers_replaced - self.replaced_before
        record.requests_reissued = rollouts.requests_reissued - self.reissued_before
        self.replaced_before, self.reissued_before = rollouts.workers_replaced, rollouts.requests_reissued
        self.state.step = record.step + 1
        self.prompts.record(record.scored)
        self.prompts.save(self.state)  # the data cursor, the prompts of steps taken ahead, the filter
        self.state.samples_trained += len(record.trained_ids)
        with (self.cfg.run_dir / "samples.jsonl").open("a") as samples_log:  # rewritten on roll-back
            write_samples(samples_log, record)
        if self.inputs.heldout_items and (self.state.step % self.cfg.eval.every_steps == 0 or self.finished):
            record.heldout = self.last_heldout = self.evaluator.evaluate()
        if self.finished:  # the final weights on the other held-out sets too
            record.heldout_sets = self.last_heldout_sets = self.evaluator.extra_sets(when="after training")
        assembled = step_metrics(self.cfg, record, self.state.policy_version)
        if self.cfg.stages:
            assembled.values["stage"] = self.plan.of(record.step).index + 1  # rft report marks stages
        self.metrics.record(
            self.state.step,
            assembled.values,
            assembled.counts,
            hack_rates=assembled.hack_rates,
            workers=assembled.workers,
            staleness=assembled.staleness,
            per_worker=assembled.per_worker,
        )
        self.registry.update_progress(
            self.cfg.name, self.state.step, self.state.policy_version, assembled.values, assembled.workers
        )
        self.progress.update(assembled.values)

    def checkpoint_if_due(self) -> None:
        if self.state.step % self.cfg.checkpoint.every_steps == 0 or self.finished:
            save_checkpoint(self.cfg, self.cfg.run_dir, self.actors.learner, self.state)
            self.stream.acknowledge(before_step=self.state.step)  # trained and now on disk
            self.prompts.forget(before_step=self.state.step)

    def recover_learner(self, failure: LearnerFailedError) -> None:
        """A learner rank failed and the group is down: start it again (at most
        learner.max_restarts times), restore the last checkpoint into it, and take the scored
        rollouts of the steps after it from the stream. The prompts and rollouts already out (the
        data cursor, the steps submitted ahead) stand, so every sample is trained exactly once."""
        while True:
            limit = self.cfg.learner.max_restarts
            if self.actors.learner.restarts >= limit:
                raise LearnerFailedError(
                    failure.rank,
                    f"{failure.cause}; the learner group was restarted {self.actors.learner.restarts} "
                    f"time(s) already (learner.max_restarts={limit}), so the job stops here. "
                    "rft run --resume continues it from the last checkpoint",
                    failure.during,
                ) from failure
            log.warning("%s: restarting the learner group from the last checkpoint", failure)
            self.metrics.learner_restarted(self.state.step, str(failure))
            try:
                self.actors.learner.restart()
                self.state = roll_back(self.cfg.run_dir, self.actors.learner, self.state)
                self.prompts.rewind(self.state)
                break
            except LearnerFailedError as again:  # failed while starting or restoring: once more
                failure = again
        self.actors.channel.replace_sender(self.actors.learner.sender)
        self.take_backlog()
        self.skipped_in_a_row = 0
        self.progress.rewind(self.state.step)

    def finish(self) -> dict:
        """The job's output (a peft adapter, or with full weights a whole model directory) and summary."""
        output = "adapter" if self.cfg.learner.lora else "model"
        output_dir = self.actors.learner.save_policy(self.cfg.run_dir / output)
        summary = {
            "job": self.cfg.name,
            "steps": self.state.step,
            "steps_planned": self.cfg.steps,
            "stopped": "max_minutes" if self.last_step < self.cfg.steps else None,  # None: all steps ran
            "policy_version": self.state.policy_version,
            "data_cursor": self.state.data_cursor,
            "samples_trained": self.state.samples_trained,
            "heldout_base": self.state.base_heldout,
            "heldout_final": self.last_heldout,
            "heldout_sets": {
                name: {"base": self.state.base_heldout_sets.get(name, {}), "final": final}
                for name, final in self.last_heldout_sets.items()
            },
            output: str(output_dir),
        }
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ---- helpers --------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state.step == self.last_step

    def export(self):
        return self.actors.learner.export(self.cfg.sync.payload)
