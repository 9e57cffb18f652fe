"""learner.losses against a float64 reference written independently: plain Python over tokens."""

from __future__ import annotations

import math

import pytest
import torch

from learner.config import AlgorithmConfig
from learner.losses import group_advantages, policy_loss

LENGTHS = [5, 3, 7, 1, 4, 6]  # valid completion tokens per sequence; the rest is padding
WIDTH = 8


def reference(new, old, mu, ref, adv, lengths, cfg):
    """The loss and metrics of the design doc, one token at a time, from nested lists of floats."""
    losses, weights_all, truncated, mismatch, clipped, kl_ref = [], [], [], [], [], []
    for i, n in enumerate(lengths):
        log_ratios = [old[i][t] - mu[i][t] for t in range(n)]
        keep = True
        if cfg.tis_mode == "token_truncate":
            raw = [math.exp(x) for x in log_ratios]
        elif cfg.tis_mode == "sequence_truncate":
            raw = [math.exp(sum(log_ratios))] * n
        else:
            raw = [1.0] * n
        if cfg.tis_mode == "sequence_mask":
            geometric_mean = math.exp(sum(log_ratios) / n)
            keep = cfg.tis_mask_low <= geometric_mean <= cfg.tis_mask_high
            truncated.append(0.0 if keep else 1.0)
        weights = [min(r, cfg.tis_cap) for r in raw]
        if cfg.tis_mode in ("token_truncate", "sequence_truncate"):
            truncated += [1.0 if r >= cfg.tis_cap else 0.0 for r in raw]
        token_losses = []
        sequence_log_ratio = sum(new[i][t] - old[i][t] for t in range(n)) / n  # GSPO
        for t in range(n):
            rho = math.exp(sequence_log_ratio if cfg.ratio_level == "sequence" else new[i][t] - old[i][t])
            rho_clipped = min(max(rho, 1 - cfg.clip_eps_low), 1 + cfg.clip_eps_high)
            if cfg.loss == "cispo":  # the clipped ratio is a constant weight on log π_θ
                loss = -weights[t] * rho_clipped * adv[i] * new[i][t]
                clipped.append(1.0 if rho_clipped != rho else 0.0)
            else:
                loss = -weights[t] * min(rho * adv[i], rho_clipped * adv[i])
                clipped.append(1.0 if rho_clipped * adv[i] < rho * adv[i] else 0.0)
            if ref is not None:
                d = ref[i][t] - new[i][t]
                kl_ref.append(math.exp(d) - d - 1)
                loss += cfg.kl_coef * kl_ref[-1]
            token_losses.append(loss if keep else 0.0)
            weights_all.append(weights[t])
            mismatch.append(math.exp(log_ratios[t]) - log_ratios[t] - 1)
        losses.append(token_losses)
    if cfg.loss_aggregation == "token_mean":
        loss = sum(sum(ls) for ls in losses) / sum(lengths)
    else:
        loss = sum(sum(ls) / len(ls) for ls in losses) / len(lengths)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics = {
        "is_weight_mean": mean(weights_all),
        "is_weight_max": max(weights_all),
        "is_truncated_fraction": mean(truncated) if truncated else 0.0,
        "mismatch_kl": mean(mismatch),
        "clip_fraction": mean(clipped),
        "kl_ref": mean(kl_ref) if kl_ref else 0.0,
    }
    return loss, metrics


def make_inputs(seed: int):
    """Random log-probs with ratios both inside and outside the clip and TIS ranges; padding is
    filled with junk (but finite) values that must not matter."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), WIDTH)
    old = -3 * torch.rand(shape, generator=g, dtype=torch.float64)
    new = old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    mu = old + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    ref = old + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(len(LENGTHS), generator=g, dtype=torch.float64)
    mask = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    junk = 5 * torch.randn(shape, generator=g, dtype=torch.float64)
    new, old, mu, ref = (torch.where(mask, x, junk) for x in (new, old, mu, ref))
    return new, old, mu, ref, adv, mask


CONFIGS = [
    dict(tis_mode=mode, loss_aggregation=agg, kl_coef=kl)
    for mode in ("token_truncate", "sequence_truncate", "sequence_mask", "off")
    for agg in ("token_mean", "sequence_mean")
    for kl in (0.0, 0.1)
] + [
    # GSPO (one ratio per sequence) and CISPO (the clipped ratio as a detached weight), each
    # with both aggregations, a KL term and TIS; a sequence's ratio varies less than a token's,
    # so its clip is tighter (GSPO's own is ~1e-3).
    dict(loss=loss, ratio_level=level, tis_mode="token_truncate", loss_aggregation=agg, kl_coef=0.1)
    | ({"clip_eps_low": 0.05, "clip_eps_high": 0.05} if level == "sequence" else {})
    for loss, level in (("ppo_clip", "sequence"), ("cispo", "token"), ("cispo", "sequence"))
    for agg in ("token_mean", "sequence_mean")
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_policy_loss_matches_reference(overrides):
    cfg = AlgorithmConfig(
        **{
            "clip_eps_low": 0.2,
            "clip_eps_high": 0.28,
            "tis_cap": 2.0,
            "tis_mask_low": 0.7,
            "tis_mask_high": 1.4,
        }
        | overrides
    )
    new, old, mu, ref, adv, mask = make_inputs(seed=0)
    use_ref = cfg.kl_coef > 0
    lists = [x.tolist() for x in (new, old, mu, ref, adv)]
    expected_loss, expected_metrics = reference(
        *lists[:3], lists[3] if use_ref else None, lists[4], LENGTHS, cfg
    )

    new_param = new.clone().requires_grad_(True)
    loss, metrics = policy_loss(new_param, old, mu, ref if use_ref else None, adv, mask, cfg)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12, abs=1e-12)
    assert metrics == pytest.approx(expected_metrics, rel=1e-12, abs=1e-12)

    # The inputs exercise every branch: some tokens clipped, some weights truncated or sequences dropped.
    assert 0 < expected_metrics["clip_fraction"] < 1
    if cfg.tis_mode != "off":
        assert 0 < expected_metrics["is_truncated_fraction"] < 1

    # Gradient w.r.t. π_θ: autograd vs central finite differences of the reference.
    loss.backward()

    def reference_loss_at(new_lists):
        return reference(new_lists, *lists[1:3], lists[3] if use_ref else None, lists[4], LENGTHS, cfg)[0]

    if cfg.loss == "cispo":
        # The stop-gradient has no finite-difference counterpart: with ρ̂ = sg(clip(ρ)) the
        # gradient is -w·ρ̂·A (+ β·dk3) per token, over the aggregation's denominator.
        expected = cispo_gradient(*lists[:4], lists[4], cfg, use_ref)
        assert torch.allclose(new_param.grad, expected, rtol=1e-10, atol=1e-12)
        return
    h = 1e-6
    for i, n in enumerate(LENGTHS):
        for t in range(WIDTH):
            if t >= n:
                assert new_param.grad[i, t] == 0  # padding gets no gradient
                continue
            plus, minus = [row[:] for row in lists[0]], [row[:] for row in lists[0]]
            plus[i][t] += h
            minus[i][t] -= h
            numeric = (reference_loss_at(plus) - reference_loss_at(minus)) / (2 * h)
            assert new_param.grad[i, t].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def cispo_gradient(new, old, mu, ref, adv, cfg, use_ref) -> torch.Tensor:
    """d loss / d π_θ for CISPO, token by token, from the reference's weights."""
    grad = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        log_ratios = [old[i][t] - mu[i][t] for t in range(n)]
        if cfg.tis_mode == "token_truncate":
            weights = [min(math.exp(x), cfg.tis_cap) for x in log_ratios]
        else:
            raise AssertionError("the CISPO configs use token_truncate")
        scale = 1 / sum(LENGTHS) if cfg.loss_aggregation == "token_mean" else 1 / (n * len(LENGTHS))
        sequence_log_ratio = sum(new[i][t] - old[i][t] for t in range(n)) / n
        for t in range(n):
            rho = math.exp(sequence_log_ratio if cfg.ratio_level == "sequence" else new[i][t] - old[i][t])
            rho_clipped = min(max(rho, 1 - cfg.clip_eps_low), 1 + cfg.clip_eps_high)
            g = -weights[t] * rho_clipped * adv[i]
            if use_ref:
                g += cfg.kl_coef * (1 - math.exp(ref[i][t] - new[i][t]))  # d k3(ref - new) / d new
            grad[i, t] = g * scale
    return grad


def test_policy_loss_float32_and_denominator():
    """float32 inputs agree with the float64 reference; micro-batch losses with the batch's
    denominator add up to the batch loss."""
    cfg = AlgorithmConfig(kl_coef=0.05)
    new, old, mu, ref, adv, mask = make_inputs(seed=1)
    full, _ = policy_loss(new, old, mu, ref, adv, mask, cfg)
    expected, _ = reference(*(x.tolist() for x in (new, old, mu, ref, adv)), LENGTHS, cfg)
    f32, _ = policy_loss(*(x.float() for x in (new, old, mu, ref, adv)), mask, cfg)
    assert f32.item() == pytest.approx(expected, rel=1e-5)
    tokens = int(mask.sum())
    parts = [
        policy_loss(new[s], old[s], mu[s], ref[s], adv[s], mask[s], cfg, denominator=tokens)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, None))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


def test_importance_weights_are_detached():
    cfg = AlgorithmConfig(tis_mode="token_truncate")
    new, old, mu, ref, adv, mask = make_inputs(seed=2)
    old = old.clone().requires_grad_(True)
    loss, _ = policy_loss(new, old, mu, None, adv, mask, cfg)
    assert not loss.requires_grad  # neither the weights nor π_old carry gradient


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert group_advantages(rewards, True, 0.0).tolist() == [1.0, -1.0, -1.0, 1.0]  # population std 0.5
    assert group_advantages(rewards, False, 1e-6).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(torch.tensor([2.0, 4.0, 9.0]), True, 1e-6).mean().abs().item() < 1e-6
    for scale in (True, False):
        # 0.7 * 8 does not average back to exactly 0.7 in float32: no residue may leak through.
        assert group_advantages(torch.full((8,), 0.7), scale, 1e-6).tolist() == [0.0] * 8
        assert group_advantages(torch.tensor([3.0]), scale, 1e-6).tolist() == [0.0]
