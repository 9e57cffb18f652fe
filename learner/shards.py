"""Data parallelism over the learner's ranks: how one TrainBatch is split into a `TrainShard` per
rank (`plan_shards`), and how the ranks' `ShardResult`s become the step's `StepStats`
(`merge_results`).

A batch is split by tokens, not by count: each sample's cost is its prompt + completion length
(what a forward/backward pass costs), and the longest go first to the rank with the fewest
tokens so far. Each rank keeps its samples in batch order and cuts them into micro-batches of
`micro_batch_size`. Every rank then runs the same number of micro-batches, because ZeRO's
gradient reduction (and ZeRO-3's parameter gathers) are collectives each rank must join: a rank
with fewer runs empty ones, a one-token dummy forward/backward with zero weight.

The batch loss is a token mean (or sequence mean) over the whole batch; DeepSpeed averages the
ranks' gradients, so each rank divides its share by (batch denominator / world size), and the
sum over ranks is the one-rank gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.config import AlgorithmConfig
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.logprobs import right_pad
from learner.losses import policy_loss


@dataclass
class TrainShard:
    """One rank's part of a step."""

    step: int
    sample_indices: list[int]  # positions in the batch of the samples below, in order
    micro_batches: list[list[TrainSample]]  # an empty one = the dummy (see module docstring)
    temperature: float
    denominator: float  # of the loss: the batch's token (or sequence) count over the world size


@dataclass
class ShardResult:
    """What a rank reports for its shard: the step's outcome and, per sample of the shard in
    order, detached per-token numbers (completion length) for the step's metrics."""

    policy_version: int  # after the step
    skipped: bool  # DeepSpeed skipped the optimizer step (non-finite gradient)
    grad_norm: float
    seconds: float
    old_logprobs: list[Tensor]
    entropy: list[Tensor]
    ref_logprobs: list[Tensor] | None = None  # with a KL term only


def sample_cost(sample: TrainSample) -> int:
    return len(sample.prompt_ids) + len(sample.completion_ids)


def assign_to_ranks(samples: list[TrainSample], num_ranks: int) -> list[list[int]]:
    """The batch positions each rank trains, balanced by tokens; each rank's in batch order."""
    loads, assigned = [0] * num_ranks, [[] for _ in range(num_ranks)]
    for index in sorted(range(len(samples)), key=lambda i: (-sample_cost(samples[i]), i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        loads[rank] += sample_cost(samples[index])
        assigned[rank].append(index)
    return [sorted(indices) for indices in assigned]


def check_batch(batch: TrainBatch) -> bool:
    """Raise on a malformed batch; False when its behaviour log-probs or advantages are not
    finite (the step is then skipped: checked here, not left to the loss, where sequence_mask
    mode would silently drop the sample)."""
    if not batch.samples:
        raise ValueError(f"step {batch.step}: empty batch")
    for s in batch.samples:
        if len(s.behaviour_logprobs) != len(s.completion_ids):
            raise ValueError(
                f"sample {s.sample_id}: {len(s.behaviour_logprobs)} behaviour logprobs "
                f"for {len(s.completion_ids)} completion tokens"
            )
    values = [v for s in batch.samples for v in s.behaviour_logprobs] + [s.advantage for s in batch.samples]
    return all(math.isfinite(v) for v in values)


def plan_shards(
    batch: TrainBatch, num_ranks: int, micro_batch_size: int, algorithm: AlgorithmConfig
) -> list[TrainShard]:
    samples = batch.samples
    tokens = sum(len(s.completion_ids) for s in samples)
    denominator = tokens if algorithm.loss_aggregation == "token_mean" else len(samples)
    shards = []
    for indices in assign_to_ranks(samples, num_ranks):
        mine = [samples[i] for i in indices]
        micro = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
        shards.append(TrainShard(batch.step, indices, micro, batch.temperature, denominator / num_ranks))
    most = max(len(shard.micro_batches) for shard in shards)
    for shard in shards:
        shard.micro_batches += [[] for _ in range(most - len(shard.micro_batches))]
    return shards


def merge_results(
    batch: TrainBatch,
    shards: list[TrainShard],
    results: list[ShardResult],
    algorithm: AlgorithmConfig,
    seconds: float,
) -> StepStats:
    """The step's StepStats from every rank's result, as one rank would have reported them: the
    metrics come from one detached `policy_loss` over the whole batch, in batch order."""
    versions = {r.policy_version for r in results}
    if len(versions) != 1 or len({r.skipped for r in results}) != 1:
        raise RuntimeError(f"step {batch.step}: the learner ranks disagree on the step: {results}")
    per_sample: dict[str, list[Tensor | None]] = {
        name: [None] * len(batch.samples) for name in ("old", "entropy", "ref")
    }
    for shard, result in zip(shards, results):
        for position, index in enumerate(shard.sample_indices):
            per_sample["old"][index] = result.old_logprobs[position]
            per_sample["entropy"][index] = result.entropy[position]
            if result.ref_logprobs is not None:
                per_sample["ref"][index] = result.ref_logprobs[position]
    behaviour = right_pad([s.behaviour_logprobs for s in batch.samples], 0.0, torch.float32)
    width = behaviour.shape[1]
    old, entropy = (_stack(per_sample[name], width) for name in ("old", "entropy"))
    ref = _stack(per_sample["ref"], width) if algorithm.kl_coef > 0 else None
    lengths = torch.tensor([len(s.completion_ids) for s in batch.samples])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    advantages = torch.tensor([s.advantage for s in batch.samples], dtype=torch.float32)
    loss, metrics = policy_loss(old, old, behaviour, ref, advantages, mask, algorithm)
    return StepStats(
        step=batch.step,
        policy_version=results[0].policy_version,
        loss=loss.item(),
        grad_norm=results[0].grad_norm,
        entropy=entropy[mask].mean().item(),
        tokens=int(lengths.sum()),
        step_seconds=seconds,
        skipped=results[0].skipped,
        rank_seconds=[r.seconds for r in results],
        **metrics,
    )


def _stack(rows: list[Tensor | None], width: int) -> Tensor:
    return torch.stack([torch.nn.functional.pad(row.float(), (0, width - row.shape[0])) for row in rows])


def skipped_stats(batch: TrainBatch, policy_version: int, seconds: float) -> StepStats:
    """The stats of a step skipped before any rank ran it (non-finite inputs)."""
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
        tokens=sum(len(s.completion_ids) for s in batch.samples),
        step_seconds=seconds,
        skipped=True,
        extra={"non_finite_inputs": 1.0},
    )


DUMMY_SAMPLE = TrainSample("dummy", [0], [0], [0.0], 0.0, 0)  # what an empty micro-batch runs
