"""How a TrainBatch is split across learner ranks (learner/shards.py): by tokens, every sample
once, the same number of micro-batches on every rank, one rank = the old fixed-count split."""

from __future__ import annotations

import math

import pytest

from learner.config import AlgorithmConfig
from learner.interface import TrainBatch, TrainSample
from learner.shards import assign_to_ranks, check_batch, plan_shards


def batch(lengths: list[tuple[int, int]]) -> TrainBatch:
    samples = [
        TrainSample(f"s{i}", [1] * prompt, [2] * completion, [-1.0] * completion, 1.0, 0)
        for i, (prompt, completion) in enumerate(lengths)
    ]
    return TrainBatch(step=3, samples=samples, temperature=1.0)


def tokens(b: TrainBatch, indices: list[int]) -> int:
    return sum(len(b.samples[i].prompt_ids) + len(b.samples[i].completion_ids) for i in indices)


def test_ranks_get_equal_tokens_not_equal_counts():
    # One long sample and six short ones: a count split (4 + 3) would give one rank 3x the work.
    b = batch([(100, 60)] + [(20, 7)] * 6)
    ranks = assign_to_ranks(b.samples, 2)
    assert ranks == [[0], [1, 2, 3, 4, 5, 6]]
    assert sorted(i for r in ranks for i in r) == list(range(7))
    assert tokens(b, ranks[0]) == 160 and tokens(b, ranks[1]) == 162


def test_each_rank_keeps_batch_order_and_the_loss_denominator_is_the_batch_s():
    b = batch([(9 + 5 * i, 3 + i) for i in range(6)])
    for aggregation, whole in (("token_mean", sum(3 + i for i in range(6))), ("sequence_mean", 6)):
        shards = plan_shards(b, 2, 2, AlgorithmConfig(loss_aggregation=aggregation))
        for shard in shards:
            assert shard.sample_indices == sorted(shard.sample_indices)
            flat = [s.sample_id for micro in shard.micro_batches for s in micro]
            assert flat == [f"s{i}" for i in shard.sample_indices]
            # Each rank's share over (batch count / ranks): DeepSpeed's average over the ranks
            # then gives the one-rank gradient.
            assert shard.denominator == whole / 2


def test_ranks_run_the_same_number_of_micro_batches():
    b = batch([(200, 50)] + [(10, 5)] * 5)  # rank 0: one long sample; rank 1: five short ones
    shards = plan_shards(b, 2, 2, AlgorithmConfig())
    assert [len(s.micro_batches) for s in shards] == [3, 3]
    assert [len(micro) for micro in shards[0].micro_batches] == [1, 0, 0]  # two empty (dummy) ones
    assert [len(micro) for micro in shards[1].micro_batches] == [2, 2, 1]


def test_more_ranks_than_samples_leaves_a_rank_only_dummies():
    shards = plan_shards(batch([(10, 5)]), 3, 4, AlgorithmConfig())
    assert [[len(m) for m in s.micro_batches] for s in shards] == [[1], [0], [0]]


def test_one_rank_is_the_fixed_count_split_in_batch_order():
    b = batch([(5 + i, 1 + (7 * i) % 5) for i in range(7)])
    [shard] = plan_shards(b, 1, 3, AlgorithmConfig())
    assert [[s.sample_id for s in micro] for micro in shard.micro_batches] == [
        ["s0", "s1", "s2"],
        ["s3", "s4", "s5"],
        ["s6"],
    ]
    assert shard.denominator == sum(len(s.completion_ids) for s in b.samples)


def test_check_batch():
    assert check_batch(batch([(3, 2)]))
    bad = batch([(3, 2)])
    bad.samples[0].behaviour_logprobs[1] = math.nan
    assert not check_batch(bad)
    short = batch([(3, 2)])
    short.samples[0].behaviour_logprobs.pop()
    with pytest.raises(ValueError, match="sample s0: 1 behaviour logprobs for 2 completion tokens"):
        check_batch(short)
    with pytest.raises(ValueError, match="step 3: empty batch"):
        check_batch(TrainBatch(step=3, samples=[], temperature=1.0))
