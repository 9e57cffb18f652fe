"""How one learner step's TrainBatch is cut up: `plan_shards`, a TrainShard per rank (the step
itself, and how the ranks' results become its StepStats: learner/steps.py).

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

The samples of one DPO pair (one `pair_id`) are one unit everywhere above: the same mini-batch,
rank and micro-batch (a pair's loss needs both), even where that exceeds a budget or
`micro_batch_size`; every other sample is a unit of its own, which leaves its split as it was.

A mini-batch's loss is divided by the objective's denominator over the mini-batch (tokens:
over the policy's tokens, learner/samples.py; sequences; pairs: learner/objectives/); DeepSpeed
averages the ranks' gradients, so each rank divides its share by (mini-batch denominator / world
size), and the sum over ranks is the one-rank gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import TrainBatch, TrainSample
from learner.objectives import OBJECTIVES


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
    objective: str = "policy_gradient"  # the batch's (learner/objectives/)
    reference: bool = False  # the loss takes π_ref per token (the same on every rank)
    learning_rate: float | None = None  # the batch's; None = learner.learning_rate

    @property
    def updates(self) -> int:
        return self.epochs * len(self.mini_batches)


@dataclass
class ShardResult:
    """What a rank reports for its shard, per sample keyed by batch position, detached and of
    completion length: π_old, the entropy, π_ref (when the loss takes it), and for each update (epoch by
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


def units(samples: list[TrainSample]) -> list[list[int]]:
    """The positions that train together, in order of first appearance: a pair's (one
    `pair_id`), or one sample's."""
    found: list[list[int]] = []
    pair_of: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        if sample.pair_id is None:
            found.append([position])
        elif sample.pair_id in pair_of:
            pair_of[sample.pair_id].append(position)
        else:
            found.append(pair_of.setdefault(sample.pair_id, [position]))
    return found


def assign_to_ranks(samples: list[TrainSample], num_ranks: int) -> list[list[int]]:
    """The positions each rank trains, balanced by tokens, unit by unit; each rank's in batch order."""
    loads, assigned = [0] * num_ranks, [[] for _ in range(num_ranks)]
    grouped = units(samples)
    cost = [sum(sample_cost(samples[i]) for i in unit) for unit in grouped]
    for k in sorted(range(len(grouped)), key=lambda k: (-cost[k], grouped[k][0])):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        loads[rank] += cost[k]
        assigned[rank] += grouped[k]
    return [sorted(indices) for indices in assigned]


def micro_batches(samples: list[TrainSample], settings: LearnerConfig) -> list[list[TrainSample]]:
    """A rank's samples as micro-batches: by padded-token budget (sorted by length, so rows of
    similar length share one; any number of rows), or without a budget `micro_batch_size` at a
    time in batch order. Each sample exactly once, a unit (`units`) whole."""
    budget, size = settings.max_tokens_per_micro_batch, settings.micro_batch_size
    grouped = [[samples[i] for i in unit] for unit in units(samples)]
    if budget is not None and settings.pack_sequences:
        return packed_rows(grouped, budget)
    batches: list[list[TrainSample]] = []
    if budget is not None:  # longest first: a unit joining a micro-batch is never longer than its first
        grouped.sort(key=lambda unit: max(map(sample_cost, unit)), reverse=True)
    for unit in grouped:
        current = batches[-1] if batches else None
        if budget is None:
            fits = current is not None and len(current) + len(unit) <= size
        else:
            fits = (
                current is not None and (len(current) + len(unit)) * max(map(sample_cost, current)) <= budget
            )
        if fits:
            current += unit
        else:
            batches.append(list(unit))
    return batches


def packed_rows(grouped: list[list[TrainSample]], budget: int) -> list[list[TrainSample]]:
    """The units as rows of at most `budget` tokens end to end, first-fit decreasing: longest
    first, each into the first row with room (a unit over the budget: a row of its own)."""
    rows: list[list[TrainSample]] = []
    room: list[int] = []
    for unit in sorted(grouped, key=lambda unit: sum(map(sample_cost, unit)), reverse=True):
        cost = sum(map(sample_cost, unit))
        row = next((k for k, free in enumerate(room) if cost <= free), None)
        if row is None:
            rows.append(list(unit))
            room.append(budget - cost)
        else:
            rows[row] += unit
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
    """`num_samples` split in order into `mini_batches` parts of near-equal count (none empty)."""
    parts = min(mini_batches, num_samples)
    bounds = [round(k * num_samples / parts) for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def mini_batch_positions(samples: list[TrainSample], mini_batches: int) -> list[list[int]]:
    """The batch's positions split in order into `mini_batches` parts, unit by unit (`units`)."""
    grouped = units(samples)
    return [
        sorted(i for unit in grouped[part.start : part.stop] for i in unit)
        for part in mini_batch_ranges(len(grouped), mini_batches)
    ]


def plan_shards(
    batch: TrainBatch, num_ranks: int, settings: LearnerConfig, algorithm: AlgorithmConfig
) -> list[TrainShard]:
    objective = OBJECTIVES[batch.objective]
    shards = [
        TrainShard(
            batch.step,
            objective.temperature(batch),
            algorithm.ppo_epochs,
            [],
            settings.pack_sequences,
            batch.objective,
            objective.needs_reference(batch.samples, algorithm),
            batch.learning_rate,
        )
        for _ in range(num_ranks)
    ]
    for positions in mini_batch_positions(batch.samples, algorithm.mini_batches):
        samples = [batch.samples[i] for i in positions]
        denominator = objective.denominator(samples, algorithm) / num_ranks
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


DUMMY_SAMPLE = TrainSample("dummy", [0], [0], [0.0], 0.0, 0)  # what an empty micro-batch runs
