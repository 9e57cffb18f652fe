"""The job driver: the only place that knows the schedule.

One step, top to bottom (see `run_job`):
  prompts -> rollout workers (Rollout, tagged with policy_version)
          -> reward pool (ScoredRollout)
          -> group-normalised advantages (TrainBatch)
          -> learner step (StepStats) -> new adapter -> weight-sync channel -> rollout workers
With `sync.max_staleness >= 1` the next step's generation runs while this step trains.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import ray
import torch

from learner.interface import TrainBatch, TrainSample
from learner.losses import group_advantages
from reward_workers.interface import ScoredRollout
from rollout_workers.interface import GenerationRequest, SamplingSettings
from services.config import JobConfig, dump_config
from services.data import PromptOrder
from services.evaluation import eval_requests, format_summary, greedy_settings, summarize
from services.job_setup import JobInputs, Actors, start_actors
from services.metrics import RunMetrics
from services.progress import StepProgress

log = logging.getLogger("rft.driver")

DRIVER_STATE = "driver_state.json"


@dataclass
class DriverState:
    """Everything besides the learner's checkpoint needed to continue a run exactly."""
    step: int = 0  # steps completed
    policy_version: int = 0
    data_cursor: int = 0
    base_heldout: dict = field(default_factory=dict)
    samples_trained: int = 0


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


# ---------------------------------------------------------------- evaluation, checkpoints

def evaluate(cfg: JobConfig, inputs: JobInputs, actors: Actors) -> dict[str, float]:
    sampling = greedy_settings(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    actors.rollouts.submit("eval", eval_requests(inputs.heldout_items, inputs.prompt_ids), sampling)
    rollouts = actors.rollouts.collect("eval")
    return summarize(actors.reward_pool.score(rollouts, inputs.items_by_id))


def save_checkpoint(cfg: JobConfig, run_dir: Path, actors: Actors, state: DriverState) -> Path:
    """Learner state + driver state into checkpoints/step_N, atomically; keep the last K."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-step_{state.step}"
    shutil.rmtree(staging, ignore_errors=True)
    ray.get(actors.learner.save_checkpoint.remote(str(staging / "learner")))
    (staging / DRIVER_STATE).write_text(json.dumps(state.__dict__, indent=2))
    target = root / f"step_{state.step}"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    for old in sorted(checkpoints(run_dir))[:-cfg.checkpoint.keep_last]:
        shutil.rmtree(old[1])
    return target


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if (p / DRIVER_STATE).is_file())


def restore(run_dir: Path, actors: Actors) -> DriverState:
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
    _, latest = found[-1]
    state = DriverState(**json.loads((latest / DRIVER_STATE).read_text()))
    ray.get(actors.learner.load_checkpoint.remote(str(latest / "learner")))
    if state.policy_version > 0:
        actors.rollouts.publish(state.policy_version, actors.learner.export_adapter.remote())
    log.info("resumed from %s (step %d, policy version %d)", latest, state.step, state.policy_version)
    return state


# ---------------------------------------------------------------- the loop

def run_job(cfg: JobConfig, inputs: JobInputs, resume: bool = False, control: JobControl | None = None) -> dict:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    actors = start_actors(cfg, inputs)
    metrics = RunMetrics(cfg.name, run_dir, cfg.metrics.host, cfg.metrics.port)
    print(f"metrics: http://{metrics.address}/metrics   run dir: {run_dir}", flush=True)
    samples_log = (run_dir / "samples.jsonl").open("a")
    try:
        state = restore(run_dir, actors) if resume else DriverState()
        if not resume and cfg.eval.at_start and inputs.heldout_items:
            state.base_heldout = evaluate(cfg, inputs, actors)
            print(f"held-out before training: {format_summary(state.base_heldout)}", flush=True)
            metrics.record(0, {"heldout_accuracy": state.base_heldout["accuracy"],
                               "heldout_reward_mean": state.base_heldout["reward_mean"]})
        order = PromptOrder(len(inputs.train_items), cfg.seed, state.data_cursor)
        sampling = lambda step: SamplingSettings(cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                                                 seed=cfg.seed * 1_000_003 + step)

        def start_generation(step: int) -> float:
            desired = control.desired_rollout_workers() if control else None
            if desired is not None and desired != len(actors.rollouts.workers):
                actors.rollouts.resize(desired)
            actors.rollouts.submit(step, step_requests(cfg, inputs, order), sampling(step))
            return time.perf_counter()

        started = start_generation(state.step)
        last_heldout = {}
        replaced_before = reissued_before = 0
        with StepProgress(cfg.steps, state.step) as progress:
            for step in range(state.step, cfg.steps):
                rollouts = actors.rollouts.collect(step)
                generation_seconds = time.perf_counter() - started
                overlap = cfg.sync.max_staleness >= 1 and step + 1 < cfg.steps
                if overlap:  # the next step's rollouts start now, from the current weights
                    started = start_generation(step + 1)

                scored = actors.reward_pool.score(rollouts, inputs.items_by_id)
                batch, zero_signal, stale = build_batch(cfg, step, scored, state.policy_version)
                values = rollout_stats(scored, generation_seconds)
                values.update(zero_signal_groups=zero_signal,
                              staleness_max=max(state.policy_version - r.policy_version for r in rollouts))

                trained_ids: set[str] = set()  # a skipped (non-finite) step trains nothing
                if batch.samples:
                    stats = ray.get(actors.learner.train_step.remote(batch))
                    if not stats.skipped:
                        trained_ids = {sample.sample_id for sample in batch.samples}
                    values.update({k: v for k, v in stats.__dict__.items() if isinstance(v, (int, float))})
                    values["learner_step_seconds"] = stats.step_seconds
                    values["clip_fraction"], values["is_truncated_fraction"] = stats.clip_frac, stats.is_truncated_frac
                    if stats.policy_version > state.policy_version:
                        sync = actors.rollouts.publish(stats.policy_version, actors.learner.export_adapter.remote())
                        values["weight_sync_seconds"] = sync.load_seconds
                        state.policy_version = stats.policy_version
                values["rollout_workers"] = len(actors.rollouts.workers)
                counts = {"grader_errors": sum(s.grader_error is not None for s in scored),
                          "stale_rollouts_dropped": stale, "samples_trained": len(trained_ids),
                          "skipped_steps": int(bool(batch.samples) and stats.skipped),
                          "rollout_workers_replaced": actors.rollouts.workers_replaced - replaced_before,
                          "requests_reissued": actors.rollouts.requests_reissued - reissued_before}
                replaced_before, reissued_before = actors.rollouts.workers_replaced, actors.rollouts.requests_reissued
                state.step, state.data_cursor = step + 1, order.cursor - (cfg.prompts_per_step if overlap else 0)
                state.samples_trained += len(trained_ids)
                values.update(step=state.step, policy_version=state.policy_version)
                for s in scored:
                    samples_log.write(json.dumps({"step": state.step, "sample_id": s.rollout.sample_id,
                                                  "policy_version": s.rollout.policy_version,
                                                  "worker_id": s.rollout.worker_id, "text": s.rollout.text,
                                                  "reward": s.reward, "components": s.components,
                                                  "grader_error": s.grader_error,
                                                  "trained": s.rollout.sample_id in trained_ids}) + "\n")
                samples_log.flush()

                last_step = state.step == cfg.steps
                if inputs.heldout_items and (state.step % cfg.eval.every_steps == 0 or last_step):
                    last_heldout = evaluate(cfg, inputs, actors)
                    values.update(heldout_accuracy=last_heldout["accuracy"],
                                  heldout_reward_mean=last_heldout["reward_mean"])
                metrics.record(state.step, values, counts)
                progress.update(values)
                if state.step % cfg.checkpoint.every_steps == 0 or last_step:
                    save_checkpoint(cfg, run_dir, actors, state)
                if not overlap and not last_step:
                    started = start_generation(step + 1)

        adapter_dir = Path(ray.get(actors.learner.save_adapter.remote(str(run_dir / "adapter"))))
        summary = {"job": cfg.name, "steps": state.step, "policy_version": state.policy_version,
                   "heldout_base": state.base_heldout, "heldout_final": last_heldout, "adapter": str(adapter_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        samples_log.close()
        metrics.close()
        actors.shutdown()
