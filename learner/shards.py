"""How one learner step's TrainBatch is cut up (`plan_shards`), and how the ranks' results become
the step's StepStats (`merge_results`).

A step is `algorithm.ppo_epochs` passes over the batch, each of `algorithm.mini_batches`
optimizer steps (the batch split in order into that many parts). Each mini-batch is split across
the ranks by tokens, not by count: a sample's cost is its prompt + completion length (what a
forward/backward costs), and the longest go first to the rank with the fewest tokens so far.
Each rank cuts its share into micro-batches: sorted by length and filled up to
`learner.max_tokens_per_micro_batch` padded tokens (rows x longest row) when that is set,
else in batch order, `learner.micro_batch_size` at a time (the old split, kept for comparison).
With `learner.pack_sequences` a micro-batch is one packed row instead: samples end to end, up to
the budget in tokens, first-fit decreasing (learner/logprobs.py `RowLayout`).
Every rank runs the same number of micro-batches per mini-batch, because ZeRO's gradient
reduction (and ZeRO-3's parameter gathers) are collectives each rank must join: a rank with
fewer runs empty ones, a one-token dummy forward/backward with zero weight.

A mini-batch's loss is a token mean (over the policy's tokens: learner/samples.py) or sequence
mean over the mini-batch; DeepSpeed averages the ranks' gradients, so each rank divides its share
by (mini-batch denominator / world size), and the sum over ranks is the one-rank gradient.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.losses import k3, policy_loss
from learner.samples import check_batch, loss_tensors, policy_tokens, refuse_untrusted

log = logging.getLogger(__name__)


@dataclass
class MiniBatchShard:
    """One rank's part of one optimizer step."""

    sample_indices: list[int]  # positions in the batch of its samples
    micro_batches: list[list[TrainSample]]  # an empty one = the dummy (see module docstring)
    denominator: float  # of the loss: the mini-batch's token (or sequence) count over the world size


@dataclass
class TrainShard:
    """One rank's part of a learner step: `epochs` passes over its mini-batch shards."""

    step: int
    temperature: float
    epochs: int
    mini_batches: list[MiniBatchShard]
    packed: bool = False  # each micro-batch is one packed row (learner.pack_sequences)

    @property
    def updates(self) -> int:
        return self.epochs * len(self.mini_batches)


@dataclass
class ShardResult:
    """What a rank reports for its shard, per sample keyed by batch position, detached and of
    completion length: π_old, the entropy, π_ref (with a KL term), and for each update (epoch by
    mini-batch, in order) π_θ of that mini-batch's samples as the update saw them."""

    policy_version: int  # after the step
    applied: list[bool]  # per update: DeepSpeed took the optimizer step (its gradient was finite)
    grad_norms: list[float]
    seconds: float
    old_logprobs: dict[int, Tensor]
    entropy: dict[int, Tensor]
    new_logprobs: list[dict[int, Tensor]]
    ref_logprobs: dict[int, Tensor] | None = None
    mean_threads: float = 0.0  # torch threads the rank used, time-weighted (learner/threads.py)


def sample_cost(sample: TrainSample) -> int:
    return len(sample.prompt_ids) + len(sample.completion_ids)


def assign_to_ranks(samples: list[TrainSample], num_ranks: int) -> list[list[int]]:
    """The positions each rank trains, balanced by tokens; each rank's in batch order."""
    loads, assigned = [0] * num_ranks, [[] for _ in range(num_ranks)]
    for index in sorted(range(len(samples)), key=lambda i: (-sample_cost(samples[i]), i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        loads[rank] += sample_cost(samples[index])
        assigned[rank].append(index)
    return [sorted(indices) for indices in assigned]


def micro_batches(samples: list[TrainSample], settings: LearnerConfig) -> list[list[TrainSample]]:
    """A rank's samples as micro-batches: by padded-token budget (sorted by length, so rows of
    similar length share one; any number of rows), or without a budget `micro_batch_size` at a
    time in batch order. Each sample exactly once."""
    budget, size = settings.max_tokens_per_micro_batch, settings.micro_batch_size
    if budget is None:
        return [samples[i : i + size] for i in range(0, len(samples), size)]
    if settings.pack_sequences:
        return packed_rows(samples, budget)
    batches: list[list[TrainSample]] = []
    for sample in sorted(samples, key=sample_cost, reverse=True):
        current = batches[-1] if batches else None
        # Longest first: a row joining a micro-batch is never longer than its first row.
        if current and (len(current) + 1) * sample_cost(current[0]) <= budget:
            current.append(sample)
        else:
            batches.append([sample])
    return batches


def packed_rows(samples: list[TrainSample], budget: int) -> list[list[TrainSample]]:
    """The samples as rows of at most `budget` tokens end to end, first-fit decreasing: longest
    first, each into the first row with room (a sample over the budget: a row of its own)."""
    rows: list[list[TrainSample]] = []
    room: list[int] = []
    for sample in sorted(samples, key=sample_cost, reverse=True):
        cost = sample_cost(sample)
        row = next((k for k, free in enumerate(room) if cost <= free), None)
        if row is None:
            rows.append([sample])
            room.append(budget - cost)
        else:
            rows[row].append(sample)
            room[row] -= cost
    return rows


def padding_fraction(shards: list[TrainShard]) -> float:
    """Share of the tokens the forward passes compute that are right-padding (none in a packed
    row: it is exactly its samples' tokens)."""
    real = padded = 0
    for shard in shards:
        for mini in shard.mini_batches:
            for micro in mini.micro_batches:
                if micro:
                    tokens = [sample_cost(s) for s in micro]
                    real += sum(tokens)
                    padded += sum(tokens) if shard.packed else len(micro) * max(tokens)
    return 1 - real / padded if padded else 0.0


def mini_batch_ranges(num_samples: int, mini_batches: int) -> list[range]:
    """The batch split in order into `mini_batches` parts of near-equal count (none empty)."""
    parts = min(mini_batches, num_samples)
    bounds = [round(k * num_samples / parts) for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def plan_shards(
    batch: TrainBatch, num_ranks: int, settings: LearnerConfig, algorithm: AlgorithmConfig
) -> list[TrainShard]:
    shards = [
        TrainShard(batch.step, batch.temperature, algorithm.ppo_epochs, [], settings.pack_sequences)
        for _ in range(num_ranks)
    ]
    for positions in mini_batch_ranges(len(batch.samples), algorithm.mini_batches):
        samples = [batch.samples[i] for i in positions]
        tokens = max(sum(policy_tokens(s) for s in samples), 1)
        denominator = (tokens if algorithm.loss_aggregation == "token_mean" else len(samples)) / num_ranks
        parts = []
        for indices in assign_to_ranks(samples, num_ranks):
            mine = [samples[i] for i in indices]
            position_of = {id(s): positions[i] for i, s in zip(indices, mine)}
            micro = micro_batches(mine, settings)
            ordered = [position_of[id(s)] for m in micro for s in m]
            parts.append(MiniBatchShard(ordered, micro, denominator))
        most = max(len(part.micro_batches) for part in parts)
        for shard, part in zip(shards, parts):
            part.micro_batches += [[] for _ in range(most - len(part.micro_batches))]
            shard.mini_batches.append(part)
    return shards


def train_batch(
    batch: TrainBatch,
    num_ranks: int,
    settings: LearnerConfig,
    algorithm: AlgorithmConfig,
    policy_version: int,
    run_shards: Callable[[list[TrainShard]], list[ShardResult]],
) -> StepStats:
    """One learner step as every learner runs it: drop the untrusted samples (counted in
    `extra["token_mismatch_samples"]`), check the rest (the step skipped, weights unchanged, on
    non-finite inputs or when every sample was refused), plan a shard per rank, `run_shards` (one
    result per shard, in rank order), merge. `policy_version`: the learner's before the step."""
    started = time.perf_counter()
    trusted, refused = refuse_untrusted(batch)
    extra = {"token_mismatch_samples": float(len(refused))}
    if refused and not trusted.samples:
        log.warning("step %d: every sample refused; step skipped", batch.step)
        stats = skipped_stats(trusted, policy_version, time.perf_counter() - started, extra)
        stats.refused_sample_ids = refused
        return stats
    if not check_batch(trusted):
        log.warning("step %d: non-finite behaviour logprobs or advantages; step skipped", batch.step)
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
    """The step's StepStats from every rank's result, as one rank would report them. Numbers
    about π_old (importance weights, mismatch KL, entropy, KL to π_ref) come from one detached
    `policy_loss` over the whole batch in batch order; the loss and the clip fraction from each
    update's π_θ (with one update, π_θ = π_old: ratio 1, clip 0)."""
    if len({r.policy_version for r in results}) != 1 or len({tuple(r.applied) for r in results}) != 1:
        raise RuntimeError(f"step {batch.step}: the learner ranks disagree on the step: {results}")
    merged = {name: {} for name in ("old", "entropy", "ref")}
    for result in results:
        merged["old"].update(result.old_logprobs)
        merged["entropy"].update(result.entropy)
        merged["ref"].update(result.ref_logprobs or {})
    everyone = range(len(batch.samples))
    inputs = _loss_inputs(batch, everyone, merged["old"], merged["ref"] if algorithm.kl_coef > 0 else None)
    loss, metrics = policy_loss(inputs[0], *inputs, algorithm)
    entropy = _stack([merged["entropy"][i] for i in everyone], inputs[-1].shape[1])
    losses, clipped = [loss.item()], []
    if shards[0].updates > 1:
        losses, clipped = _update_losses(batch, shards, results, merged, algorithm)
        metrics["clip_fraction"] = sum(c * n for c, n in clipped) / sum(n for _, n in clipped)
    applied_norms = [g for g, ok in zip(results[0].grad_norms, results[0].applied) if ok]
    return StepStats(
        step=batch.step,
        policy_version=results[0].policy_version,
        loss=sum(losses) / len(losses),
        grad_norm=sum(applied_norms) / len(applied_norms) if applied_norms else math.nan,
        entropy=entropy[inputs[-1]].mean().item(),
        tokens=int(inputs[-1].sum()),
        step_seconds=seconds,
        skipped=not any(results[0].applied),
        rank_seconds=[r.seconds for r in results],
        padding_fraction=padding_fraction(shards),
        extra={
            **mismatch_by_lag(batch, inputs[0], inputs[1], inputs[-1], version_before),
            "learner_threads": sum(r.mean_threads for r in results) / len(results),
        },
        **metrics,
    )


def _update_losses(batch, shards, results, merged, algorithm) -> tuple[list[float], list[tuple[float, int]]]:
    """Each update's loss and (clip fraction, tokens), recomputed from its π_θ."""
    losses, clipped = [], []
    ranges = mini_batch_ranges(len(batch.samples), algorithm.mini_batches)
    for update in range(shards[0].updates):
        positions = ranges[update % len(ranges)]
        new = {}
        for result in results:
            new.update(result.new_logprobs[update])
        old, *rest = _loss_inputs(
            batch, positions, merged["old"], merged["ref"] if algorithm.kl_coef > 0 else None
        )
        new_logprobs = _stack([new[i] for i in positions], old.shape[1])
        loss, metrics = policy_loss(new_logprobs, old, *rest, algorithm)
        losses.append(loss.item())
        clipped.append((metrics["clip_fraction"], int(rest[-1].sum())))
    return losses, clipped


def _loss_inputs(batch: TrainBatch, positions, old: dict, ref: dict | None):
    """(π_old, μ, π_ref | None, advantages, mask) of the samples at `positions`, right-padded."""
    samples = [batch.samples[i] for i in positions]
    width = max(len(s.completion_ids) for s in samples)
    behaviour, advantages, mask = loss_tensors(samples, width)
    old_logprobs = _stack([old[i] for i in positions], width)
    ref_logprobs = _stack([ref[i] for i in positions], width) if ref is not None else None
    return old_logprobs, behaviour, ref_logprobs, advantages, mask


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


def _stack(rows: list[Tensor], width: int) -> Tensor:
    return torch.stack([torch.nn.functional.pad(row.float(), (0, width - row.shape[0])) for row in rows])


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


DUMMY_SAMPLE = TrainSample("dummy", [0], [0], [0.0], 0.0, 0)  # what an empty micro-batch runs
