"""Multi-turn samples (docs/agentic.md) in the loss: only the policy's tokens (`loss_mask` 1) count,
in the loss, its denominators, the importance weights, the sequence ratios and every metric; and
the checks that refuse a sample whose tokens changed (learner/samples.py, core/tokens.py)."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from core.tokens import token_checksum
from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import TrainBatch, TrainSample
from learner.logprobs import completion_logprobs, right_pad
from learner.losses import policy_loss
from learner.samples import check_batch, loss_tensors, policy_tokens, refuse_untrusted
from learner.shards import plan_shards
from tests.unit.test_losses import CONFIGS, LENGTHS, make_inputs, reference
from tests.unit.test_packed_logprobs import tiny_llama

ALGORITHM = {
    "clip_eps_low": 0.2,
    "clip_eps_high": 0.28,
    "tis_cap": 2.0,
    "tis_mask_low": 0.7,
    "tis_mask_high": 1.4,
}


def policy_mask_for(lengths: list[int], width: int, seed: int) -> torch.Tensor:
    """Random observation tokens inside each completion, at least one policy token in each."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(lengths), width, generator=g) < 0.6
    mask[:, 0] = True
    return mask & (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_masked_loss_and_gradient_match_a_float64_reference_over_the_policy_tokens(overrides):
    """The reference (tests/unit/test_losses.py, plain Python) sees only the policy's tokens of
    each sequence, as if the observations were not there; μ at observation tokens is NaN here and
    must not matter. Gradient: the reference's central differences at every policy token, and
    exactly 0 at observation tokens; and the loss on the policy's tokens alone, without the
    observations, gives the same gradient (for CISPO too, whose weight is a stop-gradient)."""
    cfg = AlgorithmConfig(**ALGORITHM | overrides)
    new, old, mu, ref, adv, valid = make_inputs(seed=3)
    mask = policy_mask_for(LENGTHS, valid.shape[1], seed=4)
    assert (valid & ~mask).any()  # there are observation tokens
    mu = torch.where(valid & ~mask, math.nan, mu)
    use_ref = cfg.kl_coef > 0
    rows = [mask[i].nonzero().squeeze(1).tolist() for i in range(len(LENGTHS))]
    kept = lambda x: [[x[i][t].item() for t in row] for i, row in enumerate(rows)]  # noqa: E731

    def reference_loss(new_lists):
        return reference(
            new_lists, kept(old), kept(mu), kept(ref) if use_ref else None, adv.tolist(), lengths, cfg
        )

    lengths = [len(row) for row in rows]
    expected_loss, expected_metrics = reference_loss(kept(new))
    new = new.clone().requires_grad_()
    loss, metrics = policy_loss(new, old, mu, ref if use_ref else None, adv, mask, cfg)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[~mask].abs().max() == 0
    # The same loss on the policy's tokens alone, packed to the left (no observations at all).
    width = max(lengths)
    dense = lambda x: right_pad(kept(x), 0.0, torch.float64, width)  # noqa: E731
    dense_new = dense(new.detach()).requires_grad_()
    dense_mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    dense_loss, _ = policy_loss(
        dense_new, dense(old), dense(mu), dense(ref) if use_ref else None, adv, dense_mask, cfg
    )
    (dense_grad,) = torch.autograd.grad(dense_loss, dense_new)
    assert dense_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert dense_grad[dense_mask].abs().max() > 1e-3
    torch.testing.assert_close(grad[mask], dense_grad[dense_mask], atol=1e-12, rtol=1e-10)
    if cfg.loss == "cispo":
        return  # its clipped ratio is a stop-gradient weight: not the derivative of the reference's value
    h = 1e-6
    for i, row in enumerate(rows):
        for column, t in enumerate(row):
            bumped = [kept(new.detach()) for _ in (0, 1)]
            bumped[0][i][column] += h
            bumped[1][i][column] -= h
            slope = (reference_loss(bumped[0])[0] - reference_loss(bumped[1])[0]) / (2 * h)
            assert grad[i, t].item() == pytest.approx(slope, abs=1e-7), (i, t)


def sample(sample_id, prompt, completion, mask=None, advantage=1.0) -> TrainSample:
    sampled = mask or [1] * len(completion)
    behaviour = [-1.5 - 0.1 * t if t >= len(sampled) or sampled[t] else 0.0 for t in range(len(completion))]
    return TrainSample(sample_id, prompt, completion, behaviour, advantage, 0, loss_mask=mask)


def test_a_mask_of_ones_is_no_mask_and_observations_are_not_counted():
    plain = sample("a", [1, 2], [3, 4, 5])
    ones = sample("a", [1, 2], [3, 4, 5], mask=[1, 1, 1])
    for got, expected in zip(loss_tensors([ones], 4), loss_tensors([plain], 4)):
        assert torch.equal(got, expected)
    episode = sample("b", [1, 2], [3, 4, 5, 6], mask=[1, 0, 0, 1])
    behaviour, _, mask = loss_tensors([episode], 5)
    assert mask.tolist() == [[True, False, False, True, False]]
    assert behaviour[0, 1:3].tolist() == [0.0, 0.0] and policy_tokens(episode) == 2
    # the denominators of a 2-rank plan count the policy's tokens only
    batch = TrainBatch(0, [plain, episode], 1.0)
    shards = plan_shards(batch, 2, LearnerConfig(), AlgorithmConfig())
    assert [s.mini_batches[0].denominator for s in shards] == [(3 + 2) / 2] * 2
    # μ at observation tokens is not checked for finiteness: it means nothing there
    episode.behaviour_logprobs[1] = math.nan
    assert check_batch(batch)
    episode.behaviour_logprobs[0] = math.nan
    assert not check_batch(batch)


def test_token_checksum_is_sha256_of_little_endian_uint32_ids():
    assert token_checksum([1, 2], [258]) == hashlib.sha256(struct.pack("<3I", 1, 2, 258)).hexdigest()
    assert (
        token_checksum([1, 2], [258])
        == hashlib.sha256(bytes([1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 0, 0])).hexdigest()
    )
    assert token_checksum([1], [2, 258]) == token_checksum([1, 2], [258])  # the ids, not the split
    assert token_checksum([1, 2], [258]) != token_checksum([1, 2], [259])


def test_untrusted_samples_are_refused_and_the_rest_kept():
    good = sample("good", [1, 2], [3, 4])
    good.token_checksum = token_checksum(good.prompt_ids, good.completion_ids)
    tampered = sample("tampered", [1, 2], [3, 4])
    tampered.token_checksum = token_checksum([1, 2], [3, 5])
    short_mask = sample("short_mask", [1, 2], [3, 4], mask=[1])
    odd_mask = sample("odd_mask", [1, 2], [3, 4], mask=[1, 2])
    unchecked = sample("unchecked", [7], [8], mask=[0])
    batch = TrainBatch(5, [good, tampered, short_mask, odd_mask, unchecked], 1.0)
    kept, refused = refuse_untrusted(batch)
    assert [s.sample_id for s in kept.samples] == ["good", "unchecked"] and kept.step == 5
    assert refused == ["tampered", "short_mask", "odd_mask"]
    assert len(batch.samples) == 5  # the caller's batch is left as it was


def episode_layouts(segments, prompt):
    """One episode (`prompt`, then `segments`: (token ids, sampled by the policy)) as samples:
    `masked`: the whole episode one sample with a loss mask; `split`: one sample per policy
    segment, everything before it its prompt. Each completion token also gets its index in the
    episode, so per-token values (π_old, μ, π_ref) are the same token's in every layout."""
    tokens, masked, split = list(prompt), [], []
    for ids, sampled in segments:
        if sampled:
            split.append((list(tokens), list(ids), list(range(len(tokens), len(tokens) + len(ids)))))
        masked += [(t, int(sampled)) for t in ids]
        tokens += ids
    whole = (
        list(prompt),
        [t for t, _ in masked],
        list(range(len(prompt), len(tokens))),
        [m for _, m in masked],
    )
    return whole, split


def loss_and_grads(model, layout, cfg, advantage, per_token):
    """policy_loss over samples laid out as `layout` [(prompt, completion, episode index, mask)],
    with π_old, μ, π_ref per episode token from `per_token`, and its gradient to the model."""
    pairs = [(p, c) for p, c, *_ in layout]
    new, valid, _ = completion_logprobs(model, pairs, 0.7)
    index = torch.zeros(valid.shape, dtype=torch.long)
    for i, (_, completion, where, *_) in enumerate(layout):
        index[i, : len(completion)] = torch.tensor(where)
    old = new.detach() + per_token["old"][index]
    samples = [
        TrainSample(
            f"s{i}",
            p,
            c,
            (old - per_token["mu"][index])[i, : len(c)].tolist(),
            advantage,
            0,
            loss_mask=rest[0] if rest else None,
        )
        for i, (p, c, _, *rest) in enumerate(layout)
    ]
    behaviour, advantages, mask = loss_tensors(samples, valid.shape[1])
    ref = new.detach() + per_token["ref"][index] if cfg.kl_coef > 0 else None
    loss, _ = policy_loss(new, old, behaviour, ref, advantages, mask, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.autograd.grad(loss, trained)


EVERY_LOSS = [
    {},
    {"ratio_level": "sequence", "clip_eps_low": 0.05, "clip_eps_high": 0.05},
    {"tis_mode": "sequence_truncate", "loss_aggregation": "sequence_mean", "kl_coef": 0.1},
    {"loss": "cispo", "tis_mode": "sequence_mask"},
]
PER_TOKEN_LOSS = [{}, {"loss": "cispo", "kl_coef": 0.1}, {"tis_mode": "off"}]


def per_token_values(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: 0.3 * torch.randn(length, generator=g, dtype=torch.float32) for name in ("old", "mu", "ref")
    }


@pytest.mark.parametrize("overrides", EVERY_LOSS, ids=str)
def test_observations_before_the_policy_s_tokens_train_as_if_they_were_prompt(overrides):
    """Masked observation tokens leading the completion = the same tokens in the prompt: the
    policy's tokens have the same contexts, ratios and denominators, for every loss."""
    cfg = AlgorithmConfig(**overrides)
    model = tiny_llama("sdpa", lora=True)
    prompt, observation, answer = [5, 9, 17], [40, 41, 42, 43], [60, 61, 62, 63, 64]
    masked, _ = episode_layouts([(observation, False), (answer, True)], prompt)
    moved = (prompt + observation, answer, masked[2][len(observation) :])
    values = per_token_values(len(prompt) + len(observation) + len(answer))
    loss, grads = loss_and_grads(model, [masked], cfg, 1.5, values)
    moved_loss, moved_grads = loss_and_grads(model, [moved], cfg, 1.5, values)
    assert loss == pytest.approx(moved_loss, rel=1e-6) and loss != 0
    for grad, moved_grad in zip(grads, moved_grads):
        torch.testing.assert_close(grad, moved_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides", PER_TOKEN_LOSS, ids=str)
def test_interleaved_turns_equal_one_sample_per_turn_only_for_per_token_losses(overrides):
    """model, tool, model: with a per-token ratio, token TIS and a token mean, the episode's loss
    is the sum over its policy tokens, so it equals its turns as separate samples (each with all
    before it as prompt). A sequence-level term (GSPO's ratio, sequence TIS, a sequence mean)
    spans the whole episode and does not split: shown below for the sequence mean."""
    cfg = AlgorithmConfig(**overrides)
    model = tiny_llama("sdpa", lora=True)
    segments = [([20, 21, 22], True), ([30, 31], False), ([50, 51, 52, 53], True)]
    masked, split = episode_layouts(segments, [5, 9])
    values = per_token_values(2 + 9, seed=1)
    loss, grads = loss_and_grads(model, [masked], cfg, -0.8, values)
    split_loss, split_grads = loss_and_grads(model, split, cfg, -0.8, values)
    assert loss == pytest.approx(split_loss, rel=1e-6) and loss != 0
    for grad, split_grad in zip(grads, split_grads):
        torch.testing.assert_close(grad, split_grad, atol=1e-6, rtol=1e-5)
    sequence_mean = AlgorithmConfig(**overrides, loss_aggregation="sequence_mean")
    # one sequence of 5 policy tokens vs two of 3 and 4 (mean of means): not the same loss
    assert loss_and_grads(model, [masked], sequence_mean, -0.8, values)[0] != pytest.approx(
        loss_and_grads(model, split, sequence_mean, -0.8, values)[0], rel=1e-3
    )
