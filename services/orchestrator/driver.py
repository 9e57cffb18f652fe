"""The job driver: the only place that knows the schedule.

One step, top to bottom (see `run_job`):
  prompts -> rollout workers (Rollout, tagged with policy_version)
          -> reward pool (ScoredRollout)
          -> group-normalised advantages (TrainBatch)
          -> learner step (StepStats) -> new adapter -> weight-sync channel -> rollout workers
Rollout workers generate continuously: with `sync.max_staleness` k, the prompts of the next k
steps are already generating while a step is graded and trained, and each prompt's group is
graded as soon as it is complete.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import ray
import torch

from learner.interface import TrainBatch, TrainSample
from learner.losses import group_advantages
from reward_workers.interface import ScoredRollout
from reward_workers.pool import hack_rates
from rollout_workers.interface import GenerationRequest, SamplingSettings
from services.orchestrator.checkpoints import DriverState, restore, save_checkpoint
from services.config import JobConfig, dump_config
from services.orchestrator.data import PromptOrder
from services.orchestrator.evaluation import eval_requests, format_summary, greedy_settings, summarize
from services.orchestrator.setup import JobInputs, Actors, start_actors
from services.orchestrator.metrics import RunMetrics
from services.orchestrator.progress import StepProgress
from services.jobs.registry import open_registry
from services.orchestrator.rollout_stream import ScoredRolloutStream

log = logging.getLogger("rft.driver")

# ---------------------------------------------------------------- prompts

class JobControl(Protocol):
    """Instructions a running job takes from outside (e.g. `rft scale` through the registry)."""

    def desired_rollout_workers(self) -> int | None:
        """How many rollout workers the job should have now; None = leave as is."""
        ...


def step_requests(cfg: JobConfig, inputs: JobInputs, order: PromptOrder) -> list[GenerationRequest]:
    requests = []
    for index in order.take(cfg.prompts_per_step):
        item = inputs.train_items[index]
        requests += [GenerationRequest(item["id"], k, inputs.prompt_ids[item["id"]])
                     for k in range(cfg.rollout.samples_per_prompt)]
    return requests


# ---------------------------------------------------------------- rewards -> advantages

def build_batch(cfg: JobConfig, step: int, scored: list[ScoredRollout], policy_version: int):
    """Group by prompt, normalise rewards within each group, enforce max_staleness."""
    groups: dict[str, list[ScoredRollout]] = defaultdict(list)
    for s in scored:
        groups[s.rollout.prompt_id].append(s)
    samples, zero_signal, stale = [], 0, 0
    for members in groups.values():
        rewards = torch.tensor([m.reward for m in members], dtype=torch.float32)
        if bool((rewards == rewards[0]).all()):
            zero_signal += 1
            if cfg.algorithm.skip_zero_signal_groups:
                continue
        advantages = group_advantages(rewards, cfg.algorithm.scale_by_std, cfg.algorithm.advantage_eps)
        for member, advantage in zip(members, advantages.tolist()):
            r = member.rollout
            if policy_version - r.policy_version > cfg.sync.max_staleness:
                stale += 1
                continue
            samples.append(TrainSample(r.sample_id, r.prompt_ids, r.completion_ids, r.behaviour_logprobs,
                                       advantage, r.policy_version))
    batch = TrainBatch(step=step, samples=samples, temperature=cfg.rollout.temperature)
    return batch, zero_signal, stale


def rollout_stats(scored: list[ScoredRollout], seconds: float) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float64)
    lengths = [len(s.rollout.completion_ids) for s in scored]
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "completion_length_mean": sum(lengths) / len(lengths),
        "truncated_completions_fraction": sum(s.rollout.finish_reason == "length" for s in scored) / len(scored),
        "rollout_tokens_per_second": sum(lengths) / max(seconds, 1e-9),
    }


# ---------------------------------------------------------------- evaluation

def evaluate(cfg: JobConfig, inputs: JobInputs, actors: Actors) -> dict[str, float]:
    sampling = greedy_settings(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    actors.rollouts.submit("eval", eval_requests(inputs.heldout_items, inputs.prompt_ids), sampling)
    rollouts = actors.rollouts.collect("eval")
    return summarize(actors.reward_pool.score(rollouts, inputs.items_by_id))


# ---------------------------------------------------------------- the loop

def run_job(cfg: JobConfig, inputs: JobInputs, resume: bool = False, control: JobControl | None = None) -> dict:
    """Run (or with `resume`, continue) the job; returns the summary also written to summary.json."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    registry = open_registry(cfg.run_root, cfg.cluster.redis_url)
    registry.register(cfg.name, dump_config(cfg), run_dir)
    stream = ScoredRolloutStream(registry.redis, cfg.name)
    if not resume:
        stream.clear()
    with registry.tracking(cfg.name):
        actors = start_actors(cfg, inputs)
        metrics = RunMetrics(cfg.name, run_dir, cfg.metrics.host, cfg.metrics.port)
        print(f"metrics: http://{metrics.address}/metrics   run dir: {run_dir}", flush=True)
        try:
            return _train(cfg, inputs, actors, metrics, stream, control or RegistryControl(registry, cfg.name),
                          resume, on_step=lambda state, values, workers: registry.update_progress(
                              cfg.name, state.step, state.policy_version, values, workers))
        finally:
            metrics.close()
            actors.shutdown()


class TrainingDivergedError(RuntimeError):
    """Too many learner steps in a row were skipped for non-finite numbers."""


class RegistryControl:
    """`rft scale` writes the desired worker count into the registry; the driver reads it here."""

    def __init__(self, registry, job_id: str):
        self.registry, self.job_id = registry, job_id

    def desired_rollout_workers(self) -> int | None:
        return self.registry.desired_rollout_workers(self.job_id)


def _train(cfg: JobConfig, inputs: JobInputs, actors: Actors, metrics: RunMetrics, stream: ScoredRolloutStream,
           control: JobControl, resume: bool, on_step) -> dict:
    run_dir = cfg.run_dir
    state = DriverState()
    if resume:
        state = restore(run_dir, actors.learner)
        if state.policy_version > 0:
            actors.rollouts.publish(state.policy_version, actors.channel.export())
    elif cfg.eval.at_start and inputs.heldout_items:
        state.base_heldout = evaluate(cfg, inputs, actors)
        print(f"held-out before training: {format_summary(state.base_heldout)}", flush=True)
        metrics.record(0, {"heldout_accuracy": state.base_heldout["accuracy"],
                           "heldout_reward_mean": state.base_heldout["reward_mean"]})
    # Scored rollouts of steps after the checkpoint, not yet trained (the run crashed): train them
    # first, as the steps they were made for, instead of generating those steps again.
    backlog = {step: scored for step, scored in stream.unacknowledged().items() if step >= state.step}
    if backlog:
        log.info("resuming with the scored rollouts of steps %s from the stream", sorted(backlog))
    order = PromptOrder(len(inputs.train_items), cfg.seed, state.data_cursor)
    sampling = lambda step: SamplingSettings(cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                                             seed=cfg.seed * 1_000_003 + step)
    started: dict[int, float] = {}  # step -> when its generation was submitted
    submitted = state.step - 1  # the last step whose prompts were taken

    def start_generation_through(last_step: int) -> None:
        """Submit every step up to `last_step` not submitted yet. Called before training step s
        with s + max_staleness: rollouts of those steps start from the weights served now
        (version s, or older only when steps were skipped), so they are at most max_staleness
        versions old when trained -- and the workers always have the next steps' prompts."""
        nonlocal submitted
        while submitted < min(last_step, cfg.steps - 1):
            submitted += 1
            desired = control.desired_rollout_workers()
            if desired is not None and desired != len(actors.rollouts.workers):
                actors.rollouts.resize(desired)
            requests = step_requests(cfg, inputs, order)  # advances the data cursor either way
            if submitted not in backlog:
                actors.rollouts.submit(submitted, requests, sampling(submitted))
            started[submitted] = time.perf_counter()

    samples_log = (run_dir / "samples.jsonl").open("a")
    last_heldout = {}
    replaced_before = reissued_before = skipped_in_a_row = 0
    with samples_log, StepProgress(cfg.steps, state.step) as progress:
        for step in range(state.step, cfg.steps):
            start_generation_through(step + cfg.sync.max_staleness)
            scored = backlog.pop(step, None)
            replayed = len(scored or [])
            generated_at = time.perf_counter()
            if scored is None:
                # Each prompt's group is graded as soon as it comes off a rollout worker.
                def arriving(groups):
                    nonlocal generated_at
                    yield from groups
                    generated_at = time.perf_counter()
                scored = actors.reward_pool.score_shares(arriving(actors.rollouts.stream(step)), inputs.items_by_id)
                stream.append(step, scored)
            generation_seconds = generated_at - started.pop(step)
            reward_seconds = time.perf_counter() - generated_at  # grading left after the last group

            batch, zero_signal, stale = build_batch(cfg, step, scored, state.policy_version)
            lags = [state.policy_version - sample.policy_version for sample in batch.samples]
            values = rollout_stats(scored, generation_seconds)
            values.update(zero_signal_groups=zero_signal, rollout_workers=len(actors.rollouts.workers),
                          generation_seconds=generation_seconds, reward_seconds=reward_seconds,
                          staleness_max=max(state.policy_version - s.rollout.policy_version for s in scored))
            trained_ids: set[str] = set()  # a skipped (non-finite) step trains nothing
            skipped, worker_values = False, {}
            if batch.samples:
                stats = ray.get(actors.learner.train_step.remote(batch))
                skipped = stats.skipped
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                if skipped_in_a_row >= cfg.learner.max_consecutive_skipped_steps:
                    raise TrainingDivergedError(
                        f"steps {step - skipped_in_a_row + 2}-{step + 1}: {skipped_in_a_row} learner steps in a row had a "
                        f"non-finite loss or gradient (learner.max_consecutive_skipped_steps={cfg.learner.max_consecutive_skipped_steps}); "
                        f"stopping. The adapter of policy version {state.policy_version} is unchanged; lower "
                        "learner.learning_rate or check the rewards, then rft run --resume from the last checkpoint.")
                if not skipped:
                    trained_ids = {sample.sample_id for sample in batch.samples}
                values.update({k: v for k, v in stats.__dict__.items() if isinstance(v, (int, float))})
                values["learner_step_seconds"] = stats.step_seconds
                values["clip_fraction"], values["is_truncated_fraction"] = stats.clip_frac, stats.is_truncated_frac
                if stats.policy_version > state.policy_version:
                    sync = actors.rollouts.publish(stats.policy_version, actors.channel.export())
                    values["weight_sync_seconds"] = sync.load_seconds
                    worker_values = {"weight_sync_worker_seconds": sync.worker_seconds,
                                     "weight_sync_pause_seconds": sync.pause_seconds}
                    state.policy_version = stats.policy_version
            counts = {"grader_errors": sum(s.grader_error is not None for s in scored),
                      "stale_rollouts_dropped": stale, "samples_trained": len(trained_ids),
                      "skipped_steps": int(skipped), "rollouts_scored": len(scored) - replayed,
                      "rollouts_replayed": replayed,
                      "rollout_workers_replaced": actors.rollouts.workers_replaced - replaced_before,
                      "requests_reissued": actors.rollouts.requests_reissued - reissued_before}
            replaced_before, reissued_before = actors.rollouts.workers_replaced, actors.rollouts.requests_reissued
            # The first prompt not trained yet: those of steps submitted ahead are taken again on resume.
            state.step, state.data_cursor = step + 1, order.cursor - cfg.prompts_per_step * (submitted - step)
            state.samples_trained += len(trained_ids)
            values.update(step=state.step, policy_version=state.policy_version)
            log_samples(samples_log, state.step, scored, trained_ids)

            last_step = state.step == cfg.steps
            if inputs.heldout_items and (state.step % cfg.eval.every_steps == 0 or last_step):
                last_heldout = evaluate(cfg, inputs, actors)
                values.update(heldout_accuracy=last_heldout["accuracy"],
                              heldout_reward_mean=last_heldout["reward_mean"])
            workers = {"rollout": len(actors.rollouts.workers), "reward": cfg.reward.num_workers, "learner": 1}
            metrics.record(state.step, values, counts, hack_rates=hack_rates(cfg.reward.grader, scored),
                           workers=workers, staleness=lags if trained_ids else None, per_worker=worker_values)
            on_step(state, values, workers)
            progress.update(values)
            if state.step % cfg.checkpoint.every_steps == 0 or last_step:
                save_checkpoint(cfg, run_dir, actors.learner, state)
                stream.acknowledge(before_step=state.step)  # trained and now on disk

    output = "adapter" if cfg.learner.lora else "model"  # a peft adapter, or (full weights) a whole model dir
    output_dir = Path(ray.get(actors.learner.save_policy.remote(str(run_dir / output))))
    summary = {"job": cfg.name, "steps": state.step, "policy_version": state.policy_version,
               "data_cursor": state.data_cursor, "samples_trained": state.samples_trained,
               "heldout_base": state.base_heldout, "heldout_final": last_heldout, output: str(output_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def log_samples(samples_log, step: int, scored: list[ScoredRollout], trained_ids: set[str]) -> None:
    """One line per rollout: text, reward breakdown, and whether it was trained (`rft report`
    and the exactly-once tests read this)."""
    for s in scored:
        samples_log.write(json.dumps({
            "step": step, "sample_id": s.rollout.sample_id, "policy_version": s.rollout.policy_version,
            "worker_id": s.rollout.worker_id, "text": s.rollout.text, "reward": s.reward,
            "components": s.components, "grader_error": s.grader_error, "hack_flags": s.hack_flags,
            "diagnostics": s.diagnostics,
            "trained": s.rollout.sample_id in trained_ids}) + "\n")
    samples_log.flush()
