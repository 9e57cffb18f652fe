"""The objectives other than GRPO/PPO against float64 references written here (learner/objectives/,
learner/teacher.py): SFT's NLL over the loss-mask tokens, DPO's pair loss and its gradient, on-policy
distillation's per-token advantages; and a DPO pair is never split by the plan (learner/shards.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import TrainBatch, TrainSample
from learner.objectives import OBJECTIVES
from learner.samples import check_batch, loss_tensors, mask_tensor, refuse_untrusted
from learner.shards import plan_shards
from learner.teacher import distillation_advantages

VOCAB, WIDTH = 11, 6
LENGTHS = [6, 3, 5, 4, 2, 6, 1, 5]  # completion tokens per sample; the rest of WIDTH is padding


def samples_with_masks(seed: int) -> list[TrainSample]:
    """Samples of LENGTHS with random observation tokens (loss_mask 0), one policy token at least."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(LENGTHS):
        mask = (torch.rand(n, generator=g) < 0.6).long().tolist()
        mask[0] = 1
        completion = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        samples.append(TrainSample(f"s{i}", [1], completion, [0.0] * n, 0.0, 0, loss_mask=mask))
    return samples


def per_token(samples: list[TrainSample], values: torch.Tensor) -> list[list[float]]:
    """values [B, WIDTH] at each sample's loss-mask tokens, as lists."""
    return [[values[i, t].item() for t, m in enumerate(s.loss_mask) if m] for i, s in enumerate(samples)]


# ---------------------------------------------------------------- sft


def test_sft_loss_is_the_token_mean_nll_of_the_mask_tokens_and_only_they_get_gradient():
    samples = samples_with_masks(seed=0)
    assert any(0 in s.loss_mask for s in samples)  # there are observation tokens
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(samples), WIDTH, VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
    # targets at padding are junk ids whose (finite) log-probs must not count
    targets = torch.randint(0, VOCAB, (len(samples), WIDTH), generator=g)
    for i, s in enumerate(samples):
        targets[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids)
    new = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)

    loss, metrics = OBJECTIVES["sft"].loss(samples, new, new.detach(), None, AlgorithmConfig())
    nll, count = 0.0, 0
    for i, s in enumerate(samples):
        for t, m in enumerate(s.loss_mask):
            if m:
                row = logits[i, t].tolist()
                nll += math.log(sum(math.exp(x) for x in row)) - row[s.completion_ids[t]]
                count += 1
    assert loss.item() == pytest.approx(nll / count, rel=1e-12) and metrics == {}

    (grad,) = torch.autograd.grad(loss, logits)
    for i, s in enumerate(samples):
        for t in range(WIDTH):
            if t < len(s.loss_mask) and s.loss_mask[t]:  # d(-log softmax)/dlogits = softmax - onehot
                expected = torch.softmax(logits[i, t].detach(), -1)
                expected[s.completion_ids[t]] -= 1
                torch.testing.assert_close(grad[i, t], expected / count, rtol=1e-12, atol=1e-15)
            else:
                assert torch.equal(grad[i, t], torch.zeros(VOCAB, dtype=torch.float64)), (i, t)


def test_sft_scores_at_temperature_1_and_needs_no_behaviour_logprobs():
    sft = OBJECTIVES["sft"]
    batch = TrainBatch(0, [TrainSample("a", [1], [2, 3], [], 0.0, 0)], temperature=0.7, objective="sft")
    assert sft.temperature(batch) == 1.0 and sft.check(batch)
    assert not sft.needs_reference(batch.samples, AlgorithmConfig(kl_coef=0.5))
    [shard] = plan_shards(batch, 1, LearnerConfig(), AlgorithmConfig())
    assert shard.temperature == 1.0 and shard.objective == "sft" and not shard.reference


# ---------------------------------------------------------------- dpo


def dpo_samples(seed: int, with_reference: bool) -> list[TrainSample]:
    """Four pairs in a scrambled order (a pair's samples apart, chosen before or after rejected)."""
    samples = samples_with_masks(seed)
    g = torch.Generator().manual_seed(seed + 100)
    order = [0, 5, 2, 7, 1, 3, 6, 4]  # pair k = positions (2k, 2k+1) of the original order
    for position, sample in enumerate(samples):
        sample.pair_id, sample.preferred = f"p{position // 2}", bool(position % 2) == bool(position // 2 % 2)
        if with_reference:
            sample.reference_logprob = -10 * torch.rand(1, generator=g, dtype=torch.float64).item()
    return [samples[i] for i in order]


def reference_dpo_loss(samples, new: torch.Tensor, ref: torch.Tensor | None, beta: float):
    """The loss (a float64 tensor, autograd through `new`), the margins, straight from the formula."""
    seq = {s.sample_id: sum(new[i, t] for t, m in enumerate(s.loss_mask) if m) for i, s in enumerate(samples)}
    if ref is None:
        ref_seq = {s.sample_id: s.reference_logprob for s in samples}
    else:
        ref_seq = {
            s.sample_id: sum(ref[i, t].item() for t, m in enumerate(s.loss_mask) if m)
            for i, s in enumerate(samples)
        }
    by_pair: dict[str, dict[bool, str]] = {}
    for s in samples:
        by_pair.setdefault(s.pair_id, {})[s.preferred] = s.sample_id
    losses, margins = [], []
    for members in by_pair.values():
        c, r = members[True], members[False]
        margin = beta * ((seq[c] - ref_seq[c]) - (seq[r] - ref_seq[r]))
        losses.append(torch.log1p(torch.exp(-margin)))  # -log σ(m)
        margins.append(margin.item())
    return sum(losses) / len(losses), margins


@pytest.mark.parametrize("with_reference", [True, False], ids=["reference_logprob", "reference_tokens"])
def test_dpo_loss_and_gradient_match_a_float64_reference(with_reference):
    samples = dpo_samples(seed=3, with_reference=with_reference)
    algorithm = AlgorithmConfig(dpo_beta=0.3)
    g = torch.Generator().manual_seed(3)
    new = (-3 * torch.rand(len(samples), WIDTH, generator=g, dtype=torch.float64)).requires_grad_()
    ref = None if with_reference else -3 * torch.rand(len(samples), WIDTH, generator=g, dtype=torch.float64)
    dpo = OBJECTIVES["dpo"]
    assert dpo.needs_reference(samples, algorithm) is (not with_reference)

    loss, metrics = dpo.loss(samples, new, new.detach(), ref, algorithm)
    expected, margins = reference_dpo_loss(samples, new, ref, algorithm.dpo_beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["dpo_reward_margin_mean"] == pytest.approx(sum(margins) / 4, rel=1e-12)
    assert metrics["dpo_preference_accuracy"] == sum(m > 0 for m in margins) / 4
    assert 0 < metrics["dpo_preference_accuracy"] < 1  # both kinds of pair are there
    (grad,) = torch.autograd.grad(loss, new)
    (expected_grad,) = torch.autograd.grad(expected, new)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    trained = mask_tensor(samples, WIDTH)
    assert (grad[trained] != 0).all() and (grad[~trained] == 0).all()  # observations, padding: none
    # micro-batches of whole pairs, each over the whole batch's pair count, sum to the loss
    first, second = [0, 4, 2, 5], [1, 7, 3, 6]
    shares = [
        dpo.loss(
            [samples[i] for i in part], new[part], None, None if ref is None else ref[part], algorithm, 4
        )[0]
        for part in (first, second)
    ]
    assert (shares[0] + shares[1]).item() == pytest.approx(loss.item(), rel=1e-12)
    with pytest.raises(ValueError, match="needs one True and one False"):  # a pair cut in two
        dpo.loss(samples[:4], new[:4], None, None if ref is None else ref[:4], algorithm)


def test_dpo_batches_are_checked_and_a_refused_sample_takes_its_pair_with_it():
    dpo = OBJECTIVES["dpo"]
    samples = dpo_samples(seed=4, with_reference=True)
    batch = TrainBatch(0, samples, temperature=0.7, objective="dpo")
    assert dpo.check(batch) and dpo.temperature(batch) == 1.0
    for bad, message in (
        ([dataclasses.replace(samples[0], pair_id=None)] + samples[1:], "has no pair_id"),
        ([dataclasses.replace(s, preferred=True) for s in samples], "needs one True and one False"),
        (samples[:-1], "needs one True and one False"),
        ([dataclasses.replace(samples[0], reference_logprob=None)] + samples[1:], "some dpo samples only"),
    ):
        with pytest.raises(ValueError, match=message):
            dpo.check(dataclasses.replace(batch, samples=bad))
    nan = [dataclasses.replace(samples[0], reference_logprob=math.nan)] + samples[1:]
    assert not dpo.check(dataclasses.replace(batch, samples=nan))

    tampered = dataclasses.replace(samples[2], loss_mask=[1])  # not one entry per token
    partner = next(s for s in samples if s.pair_id == tampered.pair_id and s is not samples[2])
    kept, refused = refuse_untrusted(
        dataclasses.replace(batch, samples=[tampered] + samples[:2] + samples[3:])
    )
    assert sorted(refused) == sorted([tampered.sample_id, partner.sample_id])
    assert len(kept.samples) == 6 and dpo.check(kept)


# ---------------------------------------------------------------- on-policy distillation


def test_distillation_advantages_are_teacher_minus_behaviour_at_the_policy_tokens():
    sample = TrainSample("a", [1], [2, 3, 4], [-1.0, 0.0, -2.5], 0.0, 0, loss_mask=[1, 0, 1])
    assert distillation_advantages(sample, [-0.5, -7.0, -3.0]) == [0.5, 0.0, -0.5]
    with pytest.raises(ValueError, match="2 teacher log-probs for 3 completion tokens"):
        distillation_advantages(sample, [-0.5, -7.0])


@pytest.mark.parametrize("tis_mode", ["token_truncate", "off"])
def test_token_advantages_make_the_policy_gradient_the_reverse_kl_gradient(tis_mode):
    """On-policy (μ = π_old = π_θ), with A_t = log q_t - μ_t: the loss is the token mean of the
    sampled reverse-KL estimate log π - log q, and its gradient is the score-function gradient of
    the reverse KL, Σ_t (log π_t - log q_t) ∇ log π_t / N (float64 autograd on the formula)."""
    samples = samples_with_masks(seed=5)
    g = torch.Generator().manual_seed(6)
    new = (-3 * torch.rand(len(samples), WIDTH, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = -3 * torch.rand(len(samples), WIDTH, generator=g, dtype=torch.float64)
    for i, s in enumerate(samples):
        s.behaviour_logprobs = new[i, : len(s.completion_ids)].tolist()
        s.token_advantages = distillation_advantages(s, teacher[i, : len(s.completion_ids)].tolist())
        s.advantage = 100.0  # replaced by the token advantages: must not matter
    pg = OBJECTIVES["policy_gradient"]
    loss, metrics = pg.loss(samples, new, new.detach(), None, AlgorithmConfig(tis_mode=tis_mode))

    policy, target = per_token(samples, new), per_token(samples, teacher)
    count = sum(map(len, policy))
    reverse_kl = sum(p - q for ps, qs in zip(policy, target) for p, q in zip(ps, qs)) / count
    # float32 μ and advantages in the loss: agreement to float32 rounding
    assert loss.item() == pytest.approx(reverse_kl, rel=1e-6)
    assert metrics["is_weight_mean"] == pytest.approx(1, abs=1e-6)
    surrogate = sum(
        (new[i, t].detach() - teacher[i, t]) * new[i, t]
        for i, s in enumerate(samples)
        for t, m in enumerate(s.loss_mask)
        if m
    )
    (grad,) = torch.autograd.grad(loss, new)
    (expected,) = torch.autograd.grad(surrogate / count, new)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


def test_token_advantages_equal_to_the_scalar_train_as_the_scalar_and_are_checked():
    samples = samples_with_masks(seed=7)
    for i, s in enumerate(samples):
        s.advantage, s.behaviour_logprobs = (
            (-1.0) ** i * (i + 1) / 4,
            [-1.0 - 0.1 * t for t in range(len(s.loss_mask))],
        )
    repeated = [
        dataclasses.replace(s, token_advantages=[s.advantage] * len(s.completion_ids)) for s in samples
    ]
    new = -2 * torch.rand(len(samples), WIDTH, generator=torch.Generator().manual_seed(8))
    for config in (AlgorithmConfig(), AlgorithmConfig(loss="cispo", ratio_level="sequence", kl_coef=0.1)):
        ref = new + 0.1
        scalar = OBJECTIVES["policy_gradient"].loss(samples, new, new - 0.05, ref, config)
        per_token_ = OBJECTIVES["policy_gradient"].loss(repeated, new, new - 0.05, ref, config)
        assert scalar[0].item() == per_token_[0].item() and scalar[1] == per_token_[1]
    mixed = repeated[:4] + samples[4:]  # one batch: the scalar ones repeated over their tokens
    assert torch.equal(loss_tensors(mixed, WIDTH)[1], loss_tensors(repeated, WIDTH)[1])

    batch = TrainBatch(0, repeated, 1.0)
    assert check_batch(batch)
    observation = next((i, t) for i, s in enumerate(repeated) for t, m in enumerate(s.loss_mask) if not m)
    repeated[observation[0]].token_advantages[observation[1]] = math.nan  # not trained: not checked
    repeated[0].advantage = math.nan  # replaced: not checked
    assert check_batch(batch)
    repeated[1].token_advantages[0] = math.nan
    assert not check_batch(batch)
    repeated[1].token_advantages.pop()
    with pytest.raises(ValueError, match="sample s1: 2 token advantages for 3 completion tokens"):
        check_batch(batch)


# ---------------------------------------------------------------- planning


def pair_batch(with_pairs: bool = True) -> TrainBatch:
    """Six pairs, the two samples of one far apart in batch order and of very different lengths."""
    samples = []
    for k in range(12):
        pair = k % 6
        samples.append(
            TrainSample(
                f"s{k}",
                [1] * (3 + 2 * k),
                [2] * (4 + 7 * (k // 6) + pair),
                [-1.0] * (4 + 7 * (k // 6) + pair),
                0.0,
                0,
                pair_id=f"p{pair}" if with_pairs else None,
                preferred=k < 6,
            )
        )
    return TrainBatch(step=1, samples=samples, temperature=1.0, objective="dpo")


SPLITS = {
    "budget": LearnerConfig(max_tokens_per_micro_batch=40),
    "rows": LearnerConfig(max_tokens_per_micro_batch=None, micro_batch_size=1),
    "packed": LearnerConfig(max_tokens_per_micro_batch=40, pack_sequences=True),
}


def where_each_sample_trains(shards) -> dict[str, tuple[int, int, int]]:
    """sample id -> (rank, mini-batch, micro-batch); every sample exactly once per mini-batch."""
    found: dict[str, tuple[int, int, int]] = {}
    for rank, shard in enumerate(shards):
        for m, mini in enumerate(shard.mini_batches):
            flat = [s for micro in mini.micro_batches for s in micro]
            assert [s.sample_id for s in flat] == [f"s{i}" for i in mini.sample_indices]
            for k, micro in enumerate(mini.micro_batches):
                for s in micro:
                    assert s.sample_id not in found
                    found[s.sample_id] = (rank, m, k)
    return found


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
@pytest.mark.parametrize("mini_batches", [1, 3])
def test_two_ranks_never_split_a_pair(split, mini_batches):
    algorithm = AlgorithmConfig(mini_batches=mini_batches)
    batch = pair_batch()
    shards = plan_shards(batch, 2, SPLITS[split], algorithm)
    found = where_each_sample_trains(shards)
    assert sorted(found) == sorted(s.sample_id for s in batch.samples)
    for k in range(6):
        assert found[f"s{k}"] == found[f"s{k + 6}"], f"pair p{k} split"
    for shard in shards:  # the loss's denominator: the mini-batch's pairs over the ranks
        assert [mini.denominator for mini in shard.mini_batches] == [6 / mini_batches / 2] * mini_batches
    assert {rank for rank, _, _ in found.values()} == {0, 1}  # both ranks train
    # The same samples without their pair ids are planned apart: this test can see a split.
    apart = where_each_sample_trains(plan_shards(pair_batch(with_pairs=False), 2, SPLITS[split], algorithm))
    assert any(apart[f"s{k}"] != apart[f"s{k + 6}"] for k in range(6))
