"""SFT, DPO and on-policy distillation through the real learner (DeepSpeed engine, gloo, CPU) on the
tiny random Llama, and the Teacher against the learner's own log-probs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import ray

from learner.interface import TrainBatch, TrainSample
from learner.learner import Learner
from learner.teacher import Teacher, distillation_advantages
from tests.conftest import build_tiny_model
from tests.integration.test_learner import TEMPERATURE, job_config, make_samples, max_abs_diff, on_policy


def fp32_learner(model_dir, **algorithm) -> Learner:
    return Learner(str(model_dir), **job_config("float32", algorithm=algorithm).learner_kwargs())


def test_one_sft_step_lowers_the_nll_of_the_trained_completions(tiny_model_dir):
    learner = fp32_learner(tiny_model_dir)
    samples = make_samples([0.0] * 4)  # no behaviour log-probs: SFT has none
    samples[1].loss_mask = [0, 0] + [1] * (len(samples[1].completion_ids) - 2)  # an observation turn
    before = learner.score_sequences(samples)
    # The batch says 0.7; SFT scores at temperature 1 all the same.
    stats = learner.train_step(TrainBatch(0, samples, temperature=TEMPERATURE, objective="sft"))
    after = learner.score_sequences(samples)

    tokens = sum(len(s.completion_ids) for s in samples) - 2
    assert not stats.skipped and stats.tokens == tokens and stats.policy_version == 1
    assert stats.loss == pytest.approx(-sum(before) / tokens, rel=1e-5)  # the mean NLL at T = 1
    assert stats.grad_norm > 0 and stats.entropy > 0
    assert stats.is_weight_mean == stats.mismatch_kl == stats.kl_ref == stats.clip_fraction == 0
    assert all(a > b for a, b in zip(after, before)), (before, after)


def preference_pairs() -> list[TrainSample]:
    """Three pairs of one prompt each: chosen s0, s2, s4; rejected s1, s3, s5."""
    samples = make_samples([0.0] * 6)
    for k, s in enumerate(samples):
        s.prompt_ids = samples[k - k % 2].prompt_ids
        s.pair_id, s.preferred = f"p{k // 2}", k % 2 == 0
    return samples


def margins(samples, policy: list[float], reference: list[float], beta: float) -> list[float]:
    delta = [p - r for p, r in zip(policy, reference)]
    return [beta * (delta[k] - delta[k + 1]) for k in range(0, len(samples), 2)]


def test_one_dpo_step_raises_the_margin_and_a_given_reference_is_the_stage_start(tiny_model_dir):
    learner = fp32_learner(tiny_model_dir, dpo_beta=0.1)
    samples = preference_pairs()
    start = learner.score_sequences(samples)  # a fresh adapter: the base model
    stats = learner.train_step(TrainBatch(0, samples, temperature=TEMPERATURE, objective="dpo"))
    # Reference = the adapter disabled = the policy before the step: every margin 0, loss log 2.
    assert not stats.skipped and stats.grad_norm > 0
    assert stats.loss == pytest.approx(math.log(2), rel=1e-6)
    assert stats.extra["dpo_reward_margin_mean"] == 0 and stats.extra["dpo_preference_accuracy"] == 0
    trained = learner.score_sequences(samples)
    moved = margins(samples, trained, start, 0.1)
    assert all(m > 0 for m in moved), moved

    # A second stage: its reference is the weights now, given per sample. Its margins start at 0
    # again, where the base model as reference would give `moved`.
    second = [dataclasses.replace(s, reference_logprob=r) for s, r in zip(samples, trained)]
    stats = learner.train_step(TrainBatch(1, second, temperature=TEMPERATURE, objective="dpo"))
    assert stats.extra["dpo_reward_margin_mean"] == pytest.approx(0, abs=1e-6)
    assert stats.loss == pytest.approx(math.log(2), rel=1e-5)
    base_referenced = learner.train_step(TrainBatch(2, samples, temperature=TEMPERATURE, objective="dpo"))
    assert base_referenced.extra["dpo_reward_margin_mean"] > sum(moved) / 3 > 0
    assert base_referenced.extra["dpo_preference_accuracy"] == 1 and base_referenced.loss < math.log(2)


def test_token_advantages_are_what_a_distillation_batch_trains(tiny_model_dir, tmp_path):
    learner = fp32_learner(tiny_model_dir)
    samples = on_policy(learner, make_samples([1.0, -1.0, 0.5]))
    initial = learner.export_adapter().sha256
    zero = [dataclasses.replace(s, token_advantages=[0.0] * len(s.completion_ids)) for s in samples]
    stats = learner.train_step(TrainBatch(0, zero, temperature=TEMPERATURE))
    # The scalar advantages (1, -1, 0.5) are replaced: no gradient at all, the adapter unchanged.
    assert not stats.skipped and stats.grad_norm == 0 and stats.loss == 0
    assert learner.export_adapter().sha256 == initial
    stats = learner.train_step(TrainBatch(1, samples, temperature=TEMPERATURE))
    assert stats.grad_norm > 0  # the same samples with their scalar advantages do train

    teacher = Teacher(str(build_tiny_model(tmp_path / "teacher", seed=1)), dtype="float32")
    on_policy(learner, samples)
    scores = teacher.batch_token_logprobs([(s.prompt_ids, s.completion_ids) for s in samples], TEMPERATURE)
    for s, teacher_logprobs in zip(samples, scores):
        s.token_advantages = distillation_advantages(s, teacher_logprobs)
    before = learner.export_adapter().sha256
    stats = learner.train_step(TrainBatch(2, samples, temperature=TEMPERATURE))
    # On-policy the loss is the token mean of log μ - log π_teacher: the reverse-KL estimate.
    reverse_kl = -sum(sum(s.token_advantages) for s in samples) / stats.tokens
    assert abs(reverse_kl) > 1e-3 and stats.loss == pytest.approx(reverse_kl, rel=1e-5)
    assert not stats.skipped and stats.grad_norm > 0 and learner.export_adapter().sha256 != before


@pytest.mark.parametrize("temperature", [TEMPERATURE, 1.0])
def test_teacher_token_logprobs_equal_the_learners_on_the_same_model(tiny_model_dir, tmp_path, temperature):
    learner = fp32_learner(tiny_model_dir)  # a fresh adapter: the base model's log-probs
    samples = make_samples([0.0] * 5)
    teacher = Teacher(str(tiny_model_dir), dtype="float32", batch_size=2)
    pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
    scored = teacher.batch_token_logprobs(pairs, temperature)
    # The teacher runs a prompt once and its completions on the prompt's KV cache, the learner
    # whole sequences: float32 rounding apart (an ulp at |log p| ~ 10 is ~1e-6).
    assert max_abs_diff(scored, learner.score(samples, temperature)) < 1e-5
    alone = teacher.token_logprobs(*pairs[3], temperature)
    assert max_abs_diff([alone], scored[3:4]) < 1e-5
    other = Teacher(str(build_tiny_model(tmp_path / "other", seed=1)), dtype="float32")
    assert max_abs_diff(other.batch_token_logprobs(pairs, temperature), scored) > 0.1  # it can differ


@pytest.mark.slow
def test_two_ranks_take_the_same_dpo_and_sft_steps_as_one(local_ray, tiny_model_dir):
    """Pairs across a group: each rank trains whole pairs over the batch's pair count (and SFT over
    its tokens), so two ranks give one rank's adapter; the group scores references like a rank."""
    from learner.group import LearnerGroup
    from tests.integration.test_learner_group import assert_same_steps

    samples = preference_pairs()
    runs = []
    for num_ranks in (1, 2):
        cfg = job_config("float32", num_ranks=num_ranks, timeout_s=300, max_tokens_per_micro_batch=40)
        group = LearnerGroup(
            str(tiny_model_dir), cfg.learner, cfg.learner_kwargs(), name=f"objectives{num_ranks}"
        )
        try:
            before = ray.get(group.export("lora"))
            reference = group.score_sequences(samples)
            given = [dataclasses.replace(s, reference_logprob=r) for s, r in zip(samples, reference)]
            stats = [
                group.train_step(TrainBatch(0, given, TEMPERATURE, objective="dpo")),
                group.train_step(TrainBatch(1, samples, TEMPERATURE, objective="sft")),
            ]
            runs.append((before, ray.get(group.export("lora")), stats))
        finally:
            group.shutdown()
    assert runs[0][2][0].loss == pytest.approx(math.log(2), rel=1e-6)  # the reference: the start
    assert_same_steps(*runs[0], *runs[1])
    for one, two in zip(runs[0][2], runs[1][2]):
        assert two.extra.get("dpo_reward_margin_mean") == pytest.approx(
            one.extra.get("dpo_reward_margin_mean")
        )


def test_a_batch_may_carry_its_own_learning_rate(tiny_model_dir):
    """A stage's learning rate: Adam's first step moves each weight with a gradient by about the
    learning rate itself (m̂ / √v̂ = ±1), so the step's size shows the rate it took."""
    learner = fp32_learner(tiny_model_dir)
    samples = make_samples([0.0] * 4)

    def largest_move(batch: TrainBatch) -> float:
        before = [p.detach().clone() for p in learner.trainable]
        learner.train_step(batch)
        return max((p.detach() - b).abs().max().item() for p, b in zip(learner.trainable, before))

    own = largest_move(TrainBatch(0, samples, temperature=1.0, objective="sft", learning_rate=3e-3))
    assert own == pytest.approx(3e-3, rel=0.01)
    assert [g["lr"] for g in learner.engine.optimizer.param_groups] == [3e-3] * len(
        learner.engine.optimizer.param_groups
    )
    learner.train_step(TrainBatch(1, samples, temperature=1.0, objective="sft"))  # None: the configured one
    assert {g["lr"] for g in learner.engine.optimizer.param_groups} == {learner.settings.learning_rate}
