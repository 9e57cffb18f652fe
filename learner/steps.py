"""One learner step as every learner runs it (`train_batch`: refuse, check, plan, run, merge), and
how the ranks' results become the step's StepStats (`merge_results`)."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from torch import Tensor

from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import StepStats, TrainBatch
from learner.logprobs import stack_padded
from learner.losses import k3
from learner.objectives import OBJECTIVES
from learner.samples import loss_tensors, mask_tensor, policy_tokens, refuse_untrusted
from learner.shards import ShardResult, TrainShard, mini_batch_positions, padding_fraction, plan_shards

log = logging.getLogger(__name__)

# StepStats fields from the policy-gradient loss's metrics (0 for the objectives without them);
# the other metrics an objective reports go to `extra`.
LOSS_FIELDS = (
    "is_weight_mean",
    "is_weight_max",
    "is_truncated_fraction",
    "mismatch_kl",
    "clip_fraction",
    "kl_ref",
)


def train_batch(
    batch: TrainBatch,
    num_ranks: int,
    settings: LearnerConfig,
    algorithm: AlgorithmConfig,
    policy_version: int,
    run_shards: Callable[[list[TrainShard]], list[ShardResult]],
) -> StepStats:
    """Drop the untrusted samples (counted in `extra["token_mismatch_samples"]`), check the rest
    with the batch's objective (the step skipped, weights unchanged, on non-finite inputs or when
    every sample was refused), plan a shard per rank, `run_shards` (one result per shard, in rank
    order), merge. `policy_version`: the learner's before the step."""
    started = time.perf_counter()
    trusted, refused = refuse_untrusted(batch)
    extra = {"token_mismatch_samples": float(len(refused))}
    if refused and not trusted.samples:
        log.warning("step %d: every sample refused; step skipped", batch.step)
        stats = skipped_stats(trusted, policy_version, time.perf_counter() - started, extra)
        stats.refused_sample_ids = refused
        return stats
    if not OBJECTIVES[batch.objective].check(trusted):
        log.warning("step %d: non-finite inputs (log-probs or advantages); step skipped", batch.step)
        extra["non_finite_inputs"] = 1.0
        return skipped_stats(trusted, policy_version, time.perf_counter() - started, extra)
    shards = plan_shards(trusted, num_ranks, settings, algorithm)
    results = run_shards(shards)
    stats = merge_results(trusted, shards, results, algorithm, time.perf_counter() - started, policy_version)
    stats.extra.update(extra)
    stats.refused_sample_ids = refused
    return stats


def merge_results(
    batch: TrainBatch,
    shards: list[TrainShard],
    results: list[ShardResult],
    algorithm: AlgorithmConfig,
    seconds: float,
    version_before: int,
) -> StepStats:
    """The step's StepStats from every rank's result, as one rank would report them. The
    objective's numbers about π_old (policy gradient: importance weights, mismatch KL, KL to
    π_ref) and the entropy come from one detached loss over the whole batch in batch order; the
    loss and the clip fraction from each update's π_θ (with one update, π_θ = π_old)."""
    if len({r.policy_version for r in results}) != 1 or len({tuple(r.applied) for r in results}) != 1:
        raise RuntimeError(f"step {batch.step}: the learner ranks disagree on the step: {results}")
    merged = _merged(results)
    objective = OBJECTIVES[batch.objective]
    everyone = list(range(len(batch.samples)))
    old, ref = _loss_inputs(batch, everyone, merged, shards[0].reference)
    loss, metrics = objective.loss(batch.samples, old, old, ref, algorithm)
    mask = mask_tensor(batch.samples, old.shape[1])
    entropy = stack_padded([merged["entropy"][i] for i in everyone], old.shape[1])
    losses = [loss.item()]
    if shards[0].updates > 1:
        losses, clip_fraction = _update_losses(batch, shards, results, merged, algorithm)
        metrics["clip_fraction"] = clip_fraction
    applied_norms = [g for g, ok in zip(results[0].grad_norms, results[0].applied) if ok]
    extra = {}
    if batch.objective == "policy_gradient":  # the others have no behaviour log-probs
        extra = mismatch_by_lag(
            batch, old, loss_tensors(batch.samples, old.shape[1])[0], mask, version_before
        )
    extra["learner_threads"] = sum(r.mean_threads for r in results) / len(results)
    return StepStats(
        step=batch.step,
        policy_version=results[0].policy_version,
        loss=sum(losses) / len(losses),
        grad_norm=sum(applied_norms) / len(applied_norms) if applied_norms else math.nan,
        entropy=entropy[mask].mean().item(),
        tokens=int(mask.sum()),
        step_seconds=seconds,
        skipped=not any(results[0].applied),
        rank_seconds=[r.seconds for r in results],
        padding_fraction=padding_fraction(shards),
        extra=extra | {k: v for k, v in metrics.items() if k not in LOSS_FIELDS},
        **{name: metrics.get(name, 0.0) for name in LOSS_FIELDS},
    )


def _merged(results: list[ShardResult]) -> dict[str, dict[int, Tensor]]:
    """Every rank's π_old, entropy and π_ref, by batch position."""
    merged = {name: {} for name in ("old", "entropy", "ref")}
    for result in results:
        merged["old"].update(result.old_logprobs)
        merged["entropy"].update(result.entropy)
        merged["ref"].update(result.ref_logprobs or {})
    return merged


def _update_losses(batch, shards, results, merged, algorithm) -> tuple[list[float], float]:
    """Each update's loss, recomputed from its π_θ, and the clip fraction over the updates'
    tokens (0 for an objective without a clip)."""
    losses, clipped, tokens = [], 0.0, 0
    objective = OBJECTIVES[batch.objective]
    parts = mini_batch_positions(batch.samples, algorithm.mini_batches)
    for update in range(shards[0].updates):
        positions = parts[update % len(parts)]
        new = {}
        for result in results:
            new.update(result.new_logprobs[update])
        samples = [batch.samples[i] for i in positions]
        old, ref = _loss_inputs(batch, positions, merged, shards[0].reference)
        new_logprobs = stack_padded([new[i] for i in positions], old.shape[1])
        loss, metrics = objective.loss(samples, new_logprobs, old, ref, algorithm)
        losses.append(loss.item())
        count = sum(policy_tokens(s) for s in samples)
        clipped, tokens = clipped + metrics.get("clip_fraction", 0.0) * count, tokens + count
    return losses, clipped / max(tokens, 1)


def _loss_inputs(batch: TrainBatch, positions: list[int], merged: dict, reference: bool):
    """(π_old, π_ref | None) of the samples at `positions`, right-padded to their longest completion."""
    width = max(len(batch.samples[i].completion_ids) for i in positions)
    old = stack_padded([merged["old"][i] for i in positions], width)
    return old, stack_padded([merged["ref"][i] for i in positions], width) if reference else None


def mismatch_by_lag(batch: TrainBatch, old: Tensor, behaviour: Tensor, mask: Tensor, version: int) -> dict:
    """KL(μ || π_old) (k3, token mean) over the samples of each staleness lag, as
    `mismatch_kl_lag<k>`: how much of the engine/learner gap is staleness rather than numerics."""
    lags = torch.tensor([version - s.policy_version for s in batch.samples])
    per_token = torch.where(mask, k3(old.double() - behaviour.double()), 0.0)
    out = {}
    for lag in sorted(set(lags.tolist())):
        rows = lags == lag
        out[f"mismatch_kl_lag{lag}"] = per_token[rows].sum().item() / max(int(mask[rows].sum()), 1)
    return out


def skipped_stats(batch: TrainBatch, policy_version: int, seconds: float, why: dict[str, float]) -> StepStats:
    """The stats of a step skipped before any rank ran it (`why`: non-finite inputs, refused samples)."""
    nan = math.nan
    return StepStats(
        step=batch.step,
        policy_version=policy_version,
        loss=nan,
        grad_norm=nan,
        is_weight_mean=nan,
        is_weight_max=nan,
        is_truncated_fraction=nan,
        mismatch_kl=nan,
        clip_fraction=nan,
        entropy=nan,
        kl_ref=nan,
        tokens=sum(policy_tokens(s) for s in batch.samples),
        step_seconds=seconds,
        skipped=True,
        extra=why,
    )
