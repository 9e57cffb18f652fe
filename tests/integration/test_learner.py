"""The learner with a real DeepSpeed engine (gloo, CPU) on the tiny random Llama."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import learner.objectives.policy_gradient as policy_gradient_module
from core.tokens import token_checksum
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.learner import Learner
from learner.logprobs import completion_logprobs, right_pad
from learner.losses import policy_loss
from services.config import JobConfig

TEMPERATURE = 0.7


def job_config(dtype: str = "bfloat16", kl_coef: float = 0.0, algorithm=None, **learner) -> JobConfig:
    learner = {"learning_rate": 1e-2, "micro_batch_size": 2, **learner}
    return JobConfig(
        data={"train": "unused.jsonl"},
        reward={"grader": {"source": "unused.py"}},
        model={"dtype": dtype},
        algorithm={"kl_coef": kl_coef, **(algorithm or {})},
        learner=learner,
    )


def make_samples(advantages: list[float], seed: int = 0, shared_prompt: bool = False) -> list[TrainSample]:
    """Random prompts and completions of different lengths (so padding is exercised)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 5000, (6,), generator=g).tolist()
    samples = []
    for i, advantage in enumerate(advantages):
        if not shared_prompt:
            prompt = torch.randint(0, 5000, (4 + 3 * i,), generator=g).tolist()
        completion = torch.randint(0, 5000, (5 + 2 * i,), generator=g).tolist()
        samples.append(TrainSample(f"s{i}", prompt, completion, [], advantage, policy_version=0))
    return samples


def on_policy(learner: Learner, samples: list[TrainSample]) -> list[TrainSample]:
    """Behaviour log-probs as an engine running the learner's own weights would report them."""
    for sample, logprobs in zip(samples, learner.score(samples, TEMPERATURE)):
        sample.behaviour_logprobs = logprobs
    return samples


def trained_one_step(cfg, model_dir) -> tuple[Learner, list[TrainSample], TrainBatch]:
    """A learner after one on-policy step; its samples and batch."""
    samples = make_samples([1.0, -1.0, 0.5])
    batch = TrainBatch(step=0, samples=samples, temperature=TEMPERATURE)
    learner = Learner(str(model_dir), **cfg.learner_kwargs())
    on_policy(learner, samples)
    learner.train_step(batch)
    return learner, samples, batch


def hf_logprobs(model, samples: list[TrainSample]) -> list[list[float]]:
    """Reference: each sequence alone, unpadded, through a plain forward pass."""
    scores = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
            logprobs = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
            scores.append(logprobs.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1).tolist())
    return scores


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


# Before training the learner matches HF exactly in bf16 (measured 0.0). With a trained adapter,
# peft upcasts LoRA weights to fp32 on load while the learner's bf16 engine computes the LoRA
# branch in bf16: measured up to 6e-3. float32 agrees to ~1e-6 either way.
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_score_matches_hf_before_training(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    learner = Learner(str(tiny_model_dir), **job_config(dtype).learner_kwargs())
    samples = make_samples([0.0] * 5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype))
    assert max_abs_diff(learner.score(samples, TEMPERATURE), hf_logprobs(base, samples)) < TOLERANCE[dtype]


def test_train_step_follows_advantages(tiny_model_dir):
    learner = Learner(str(tiny_model_dir), **job_config(kl_coef=0.01).learner_kwargs())
    samples = on_policy(learner, make_samples([1.0, -1.0], shared_prompt=True))
    before = [sum(x) for x in learner.score(samples, TEMPERATURE)]

    stats = learner.train_step(TrainBatch(step=0, samples=samples, temperature=TEMPERATURE))
    after = [sum(x) for x in learner.score(samples, TEMPERATURE)]
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
    assert not stats.skipped and stats.policy_version == learner.policy_version == 1
    assert stats.tokens == sum(len(s.completion_ids) for s in samples)
    assert math.isfinite(stats.grad_norm) and stats.grad_norm > 0
    # Behaviour = the learner's own log-probs: no mismatch, unit weights, nothing clipped, and
    # the adapter starts as a no-op, so π_θ = π_ref exactly.
    assert stats.mismatch_kl == pytest.approx(0, abs=1e-6) and stats.is_weight_mean == pytest.approx(
        1, abs=1e-5
    )
    assert stats.clip_fraction == 0 and stats.kl_ref == 0 and stats.entropy > 0

    stats = learner.train_step(TrainBatch(step=1, samples=samples, temperature=TEMPERATURE))
    assert stats.kl_ref > 0 and stats.mismatch_kl > 0 and stats.policy_version == 2


def reference_grad_norm(model_dir, adapter, samples, cfg: JobConfig) -> float:
    """The gradient norm of the batch loss with plain torch autograd: no DeepSpeed, no micro-batches."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            **{
                k: v
                for k, v in adapter.peft_config.items()
                if k in ("r", "lora_alpha", "target_modules", "task_type")
            }
        ),
    )
    set_peft_model_state_dict(model, adapter.tensors)
    new, mask, _ = completion_logprobs(
        model, [(s.prompt_ids, s.completion_ids) for s in samples], TEMPERATURE
    )
    behaviour = right_pad([s.behaviour_logprobs for s in samples], 0.0, torch.float32)
    advantages = torch.tensor([s.advantage for s in samples])
    loss, _ = policy_loss(new, new.detach(), behaviour, None, advantages, mask, cfg.algorithm)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


def test_micro_batches_accumulate_to_one_batch_step(tiny_model_dir):
    """Token-mean over the whole batch regardless of micro-batching (1 or 4 rows at a time in
    order, by a 40-token budget: [s3], [s2, s1], [s0] sorted by length, or packed rows of 40
    tokens: [s3], [s2, s0], [s1]): same loss, grad norm, update, and the grad norm DeepSpeed
    reports is the true one."""
    samples = make_samples([1.0, -0.5, 0.25, -1.5])
    results = []
    splits = [
        {"micro_batch_size": 1, "max_tokens_per_micro_batch": None},
        {"micro_batch_size": 4, "max_tokens_per_micro_batch": None},
        {"max_tokens_per_micro_batch": 40},
        {"max_tokens_per_micro_batch": 40, "pack_sequences": True},
    ]
    for split in splits:
        cfg = job_config("float32", **split)
        learner = Learner(str(tiny_model_dir), **cfg.learner_kwargs())
        initial = learner.export_adapter()
        stats = learner.train_step(
            TrainBatch(step=0, samples=on_policy(learner, samples), temperature=TEMPERATURE)
        )
        results.append((stats, learner.export_adapter().tensors))
    (stats_1, tensors_1), *others = results
    assert stats_1.grad_norm == pytest.approx(
        reference_grad_norm(tiny_model_dir, initial, samples, cfg), rel=1e-4
    )
    assert others[1][0].padding_fraction < stats_1.padding_fraction or stats_1.padding_fraction == 0
    assert others[-1][0].padding_fraction == 0  # packed rows
    for stats, tensors in others:
        assert stats_1.loss == pytest.approx(stats.loss, rel=1e-5)
        assert stats_1.grad_norm == pytest.approx(stats.grad_norm, rel=1e-4)
        # Adam's first step is ~lr·g/(|g| + eps): where g ~ eps, rounding-level gradient
        # differences move an element by a visible fraction of lr (1e-2), hence atol = lr / 100.
        for name in tensors_1:
            torch.testing.assert_close(tensors_1[name], tensors[name], rtol=1e-4, atol=1e-4)


def test_packed_steps_equal_sorted_ones_with_epochs_and_a_reference(tiny_model_dir):
    """Packing through the DeepSpeed engine around peft: π_θ, π_ref (adapter disabled) and the
    π_old snapshot of two epochs over two mini-batches, as the sorted split gives them."""
    samples = make_samples([1.0, -0.5, 0.25, -1.5, 2.0, -1.0])
    algorithm = {"ppo_epochs": 2, "mini_batches": 2}
    results = []
    for packed in (False, True):
        cfg = job_config(
            "float32", kl_coef=0.1, algorithm=algorithm, max_tokens_per_micro_batch=48, pack_sequences=packed
        )
        learner = Learner(str(tiny_model_dir), **cfg.learner_kwargs())
        on_policy(learner, samples)
        pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
        with torch.no_grad():
            scored = completion_logprobs(learner.engine, pairs, TEMPERATURE, 8, packed=packed)[0]
        stats = [learner.train_step(TrainBatch(step, samples, TEMPERATURE)) for step in (0, 1)]
        results.append((scored, stats, learner.export_adapter().tensors))
    (scored, stats, tensors), (packed_scored, packed_stats, packed_tensors) = results
    torch.testing.assert_close(packed_scored, scored, atol=1e-5, rtol=0)
    for sorted_step, packed_step in zip(stats, packed_stats):
        assert packed_step.padding_fraction == 0 < sorted_step.padding_fraction
        for name in ("loss", "grad_norm", "entropy", "kl_ref", "clip_fraction", "mismatch_kl"):
            assert getattr(packed_step, name) == pytest.approx(getattr(sorted_step, name), rel=1e-4, abs=1e-6)
    assert stats[1].kl_ref > 0 and stats[1].clip_fraction > 0  # the reference and the clip took part
    # Eight Adam updates, each able to move an element whose gradient is ~eps by a fraction of lr
    # (see the test above): measured 7e-4 (AVX-512 box) and 1.05e-3 (AVX2 box) at one element of
    # 2048, the rest within 1e-4. A packing bug (a wrong mask or position) moves many elements.
    for name in tensors:
        difference = (packed_tensors[name] - tensors[name]).abs()
        assert float(difference.max()) < 1e-2  # below one step of lr
        assert int((difference > 1e-4).sum()) <= max(1, difference.numel() // 1000), name


def trained(samples: list[TrainSample], model_dir, **learner) -> tuple[StepStats, dict]:
    """One fp32 step on `samples` (behaviour log-probs as given) from the seeded initial adapter."""
    learner = Learner(str(model_dir), **job_config("float32", **learner).learner_kwargs())
    stats = learner.train_step(TrainBatch(step=0, samples=samples, temperature=TEMPERATURE))
    return stats, learner.export_adapter().tensors


def off_policy(samples: list[TrainSample]) -> list[TrainSample]:
    for s in samples:
        s.behaviour_logprobs = [-8.0 - 0.1 * t for t in range(len(s.completion_ids))]
    return samples


def test_observation_tokens_are_context_not_trained(tiny_model_dir):
    """A loss mask of ones trains as no mask, bit for bit; observation tokens masked at the start
    of a completion train as the same tokens moved into the prompt (the policy's tokens keep
    their contexts and the token-mean denominator counts them alone): loss, grad norm, update."""
    plain = off_policy(make_samples([1.0, -0.5, 0.25]))
    ones = [dataclasses.replace(s, loss_mask=[1] * len(s.completion_ids)) for s in plain]
    masked = [dataclasses.replace(s, loss_mask=[0] * 3 + [1] * (len(s.completion_ids) - 3)) for s in plain]
    for s in masked:  # μ is 0.0 at observation tokens, as the rollout worker sends it
        s.behaviour_logprobs = [0.0] * 3 + s.behaviour_logprobs[3:]
    moved = [
        dataclasses.replace(
            s,
            prompt_ids=s.prompt_ids + s.completion_ids[:3],
            completion_ids=s.completion_ids[3:],
            behaviour_logprobs=s.behaviour_logprobs[3:],
        )
        for s in plain
    ]
    (plain_stats, plain_tensors), (ones_stats, ones_tensors) = (
        trained(b, tiny_model_dir) for b in (plain, ones)
    )
    assert plain_stats.loss == ones_stats.loss and plain_stats.grad_norm == ones_stats.grad_norm
    assert all(torch.equal(plain_tensors[name], ones_tensors[name]) for name in plain_tensors)
    (masked_stats, masked_tensors), (moved_stats, moved_tensors) = (
        trained(b, tiny_model_dir) for b in (masked, moved)
    )
    assert masked_stats.tokens == moved_stats.tokens == plain_stats.tokens - 9
    for name in ("loss", "grad_norm", "entropy", "mismatch_kl", "is_weight_mean"):
        assert getattr(masked_stats, name) == pytest.approx(getattr(moved_stats, name), rel=1e-5), name
    assert masked_stats.grad_norm != pytest.approx(plain_stats.grad_norm, rel=1e-2)  # the mask acted
    for name in masked_tensors:
        torch.testing.assert_close(masked_tensors[name], moved_tensors[name], rtol=1e-4, atol=1e-4)


def test_tampered_samples_are_refused_and_counted_while_the_rest_train(tiny_model_dir):
    samples = off_policy(make_samples([1.0, -0.5, 0.25, -1.0]))
    for s in samples:
        s.token_checksum = token_checksum(s.prompt_ids, s.completion_ids)
    good = [samples[0], samples[2]]
    tampered, bad_mask = samples[1], samples[3]
    tampered.completion_ids = [tampered.completion_ids[0] + 1] + tampered.completion_ids[1:]
    bad_mask.loss_mask = [1] * (len(bad_mask.completion_ids) - 1)
    stats, tensors = trained(samples, tiny_model_dir)
    good_stats, good_tensors = trained(good, tiny_model_dir)
    assert stats.extra["token_mismatch_samples"] == 2 and good_stats.extra["token_mismatch_samples"] == 0
    assert not stats.skipped and stats.tokens == good_stats.tokens == sum(len(s.completion_ids) for s in good)
    assert stats.loss == good_stats.loss and stats.grad_norm == good_stats.grad_norm
    assert all(torch.equal(tensors[name], good_tensors[name]) for name in tensors)

    learner = Learner(str(tiny_model_dir), **job_config("float32").learner_kwargs())
    before = learner.export_adapter().sha256
    stats = learner.train_step(TrainBatch(step=0, samples=[tampered, bad_mask], temperature=TEMPERATURE))
    assert stats.skipped and stats.extra["token_mismatch_samples"] == 2 and math.isnan(stats.loss)
    assert learner.policy_version == 0 and learner.export_adapter().sha256 == before


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_exported_adapter_loads_in_peft(tiny_model_dir, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = Learner(str(tiny_model_dir), **job_config(dtype).learner_kwargs())
    samples = on_policy(learner, make_samples([1.0, -1.0, 0.5]))
    learner.train_step(TrainBatch(step=0, samples=samples, temperature=TEMPERATURE))
    adapter = learner.export_adapter()
    adapter.verify()
    assert adapter.version == 1 and adapter.peft_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert all(".default." not in name for name in adapter.tensors)

    learner.save_adapter(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert (
        max_abs_diff(learner.score(samples, TEMPERATURE), hf_logprobs(peft_model, samples)) < TOLERANCE[dtype]
    )

    # The export is a copy: further training leaves it (and its checksum) intact.
    learner.train_step(TrainBatch(step=1, samples=samples, temperature=TEMPERATURE))
    adapter.verify()
    assert learner.export_adapter().sha256 != adapter.sha256


def test_checkpoint_restores_adapter_optimizer_and_version(tiny_model_dir, tmp_path):
    original, samples, batch = trained_one_step(job_config(), tiny_model_dir)
    original.save_checkpoint(tmp_path / "ckpt")  # twice: replacing an existing checkpoint works
    original.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers

    restored = Learner(str(tiny_model_dir), **job_config().learner_kwargs())
    restored.load_checkpoint(tmp_path / "ckpt")
    assert restored.policy_version == original.policy_version == 1
    assert restored.export_adapter().sha256 == original.export_adapter().sha256
    assert restored.score(samples, TEMPERATURE) == original.score(samples, TEMPERATURE)
    # Adam's moments came back too: a second step (Adam's update depends on them) agrees.
    original.train_step(batch)
    restored.train_step(batch)
    assert restored.export_adapter().sha256 == original.export_adapter().sha256


def test_non_finite_steps_are_skipped(tiny_model_dir, monkeypatch):
    learner = Learner(str(tiny_model_dir), **job_config().learner_kwargs())
    samples = on_policy(learner, make_samples([1.0, -1.0]))
    checksum = learner.export_adapter().sha256

    def step(batch_samples):
        stats = learner.train_step(TrainBatch(step=0, samples=batch_samples, temperature=TEMPERATURE))
        return stats, learner.export_adapter().sha256

    nan_behaviour = [
        TrainSample(**{**vars(s), "behaviour_logprobs": [math.nan] + s.behaviour_logprobs[1:]})
        for s in samples
    ]
    nan_advantage = [TrainSample(**{**vars(s), "advantage": math.nan}) for s in samples]
    for bad in (nan_behaviour, nan_advantage):
        stats, after = step(bad)
        assert stats.skipped and stats.policy_version == 0 and after == checksum

    # A non-finite loss from the computation itself: DeepSpeed's optimizer refuses the step.
    real_loss = policy_gradient_module.policy_loss
    monkeypatch.setattr(
        policy_gradient_module,
        "policy_loss",
        lambda *a, **k: (lambda loss, m: (loss * math.nan, m))(*real_loss(*a, **k)),
    )
    stats, after = step(samples)
    assert stats.skipped and not math.isfinite(stats.grad_norm) and after == checksum
    monkeypatch.undo()

    stats, after = step(samples)  # the engine is left clean: the next step trains
    assert not stats.skipped and stats.policy_version == 1 and after != checksum


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_other_zero_stages_train_and_export(tiny_model_dir, stage):
    learner = Learner(str(tiny_model_dir), **job_config(zero_stage=stage).learner_kwargs())
    samples = on_policy(learner, make_samples([1.0, -1.0]))
    initial = learner.export_adapter()
    stats = learner.train_step(TrainBatch(step=0, samples=samples, temperature=TEMPERATURE))
    trained = learner.export_adapter()
    assert not stats.skipped and trained.version == 1
    assert trained.tensors.keys() == initial.tensors.keys()
    assert all(
        trained.tensors[k].shape == initial.tensors[k].shape and trained.tensors[k].numel() > 0
        for k in initial.tensors
    )
    assert trained.sha256 != initial.sha256


def test_zero_stage_0_float32_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="zero_stage"):
        Learner(str(tiny_model_dir), **job_config("float32", zero_stage=0).learner_kwargs())


@pytest.mark.parametrize(
    "algorithm",
    [
        {"loss": "ppo_clip", "ratio_level": "token"},
        {"loss": "cispo", "ratio_level": "token"},
        {"loss": "ppo_clip", "ratio_level": "sequence", "clip_eps_low": 0.02, "clip_eps_high": 0.02},
    ],
    ids=["ppo_clip", "cispo", "gspo"],
)
def test_two_epochs_make_the_clip_bind_and_the_loss_matches_float64(tiny_model_dir, algorithm):
    """ppo_epochs 2: the second pass trains against the snapshot π_old, so ρ != 1 and the clip
    acts. Its loss, recomputed in float64 from π_θ after the first update (a twin learner that
    took one step), matches what the learner reports (the mean over its two updates)."""
    from tests.unit.test_losses import reference

    samples = make_samples([1.0, -1.0, 0.5, -0.5, 2.0])
    batch = TrainBatch(step=0, samples=samples, temperature=TEMPERATURE)
    two_epochs = job_config("float32", learning_rate=5e-2, algorithm={"ppo_epochs": 2, **algorithm})
    learner = Learner(str(tiny_model_dir), **two_epochs.learner_kwargs())
    on_policy(learner, samples)
    for s in samples:  # off-policy behaviour (so the importance weights are not all 1)
        s.behaviour_logprobs = [x - 0.05 * (t % 3) for t, x in enumerate(s.behaviour_logprobs)]
    old = learner.score(samples, TEMPERATURE)
    stats = learner.train_step(batch)
    assert stats.policy_version == 1 and not stats.skipped  # one version for the two updates

    twin = Learner(
        str(tiny_model_dir), **job_config("float32", learning_rate=5e-2, algorithm=algorithm).learner_kwargs()
    )
    twin.train_step(batch)  # the same first update
    after_first = twin.score(samples, TEMPERATURE)
    cfg = two_epochs.algorithm
    lists = dict(old=old, mu=[s.behaviour_logprobs for s in samples], adv=[s.advantage for s in samples])
    lengths = [len(s.completion_ids) for s in samples]
    first_loss, _ = reference(old, old, lists["mu"], None, lists["adv"], lengths, cfg)
    second_loss, second = reference(after_first, old, lists["mu"], None, lists["adv"], lengths, cfg)
    assert second["clip_fraction"] > 0
    assert stats.clip_fraction == pytest.approx(second["clip_fraction"] / 2, abs=1e-6)
    assert stats.loss == pytest.approx((first_loss + second_loss) / 2, rel=1e-4, abs=1e-6)
