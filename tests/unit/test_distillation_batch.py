"""A distill step's batch on the tiny model: rollouts sampled by the real HF rollout engine, scored
by a real `Teacher` after the teacher's own prompt. Each token's advantage is the teacher's log-prob
minus the behaviour log-prob, against a float64 reference computed here with transformers; the
student as its own teacher, in the student's context, gives advantages of ~0 (its behaviour
log-probs are its own); stale rollouts are left out, flat groups kept and counted."""

from __future__ import annotations

import json

import pytest
import torch

from learner.config import LearnerConfig
from learner.teacher import Teacher
from reward_workers.interface import ScoredRollout
from rollout_workers.hf_engine import HFEngine
from rollout_workers.interface import Rollout, SamplingSettings
from services.config import load_config
from services.orchestrator.distillation import distillation_batch
from services.orchestrator.setup import prepare_inputs

TEMPERATURE = 0.7
ITEMS = [
    {"id": "chat", "messages": [{"role": "user", "content": "What is 3 + 4?"}]},
    {"id": "plain", "prompt": "3 + 4 ="},
]
POLICY_VERSION = 2  # the learner's when the batch is built; max_staleness 1 leaves out version 0


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("distill")
    (directory / "train.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (directory / "grader.py").write_text("def grade(sample, item):\n    return 1.0\n")
    config = directory / "job.yaml"
    config.write_text(f"""
model: {{path: {tiny_model_dir}, dtype: float32}}
data: {{train: train.jsonl}}
reward: {{grader: {{source: grader.py}}}}
rollout: {{samples_per_prompt: 2, temperature: {TEMPERATURE}, max_new_tokens: 6}}
sync: {{max_staleness: 1}}
stages: [{{kind: distill, steps: 1, teacher: {{system_prompt: "Answer in one word."}}}}]
""")
    cfg = load_config(config)
    return cfg, prepare_inputs(cfg)


@pytest.fixture(scope="module")
def scored(job, tiny_model_dir) -> list[ScoredRollout]:
    """Two samples of each item from the student; the chat item's group flat (equal rewards), the
    plain item's second sample generated three versions back (stale)."""
    cfg, inputs = job
    engine = HFEngine(tiny_model_dir, "float32", LearnerConfig().lora_shape)
    scored = []
    for seed, item in enumerate(ITEMS):
        prompt = inputs.prompt_ids[item["id"]]
        completions = engine.generate([prompt, prompt], SamplingSettings(TEMPERATURE, 6, seed=seed))
        for index, c in enumerate(completions):
            stale = item["id"] == "plain" and index == 1
            rollout = Rollout(
                item["id"],
                index,
                prompt,
                c.completion_ids,
                c.behaviour_logprobs,
                0 if stale else 1,
                "length",
                c.text,
            )
            scored.append(ScoredRollout(rollout, reward=1.0 if item["id"] == "chat" else float(index)))
    return scored


@pytest.fixture(scope="module")
def teacher(tiny_model_dir) -> Teacher:
    return Teacher(str(tiny_model_dir), dtype="float32", batch_size=2)  # two forwards for three sequences


def reference_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """float64 log softmax(logits / temperature) of each completion token after the prompt."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    at_completion = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / TEMPERATURE
    return at_completion.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_token_advantages_are_the_teachers_logprobs_after_its_prompt_minus_the_behaviour(
    job, scored, teacher, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    cfg, inputs = job
    teacher_prompts = inputs.teachers[0].prompt_ids
    built = distillation_batch(cfg, 0, scored, POLICY_VERSION, teacher.batch_token_logprobs, teacher_prompts)
    batch = built.batch
    assert (built.stale_dropped, built.zero_signal_groups, built.signal_groups) == (1, 1, 1)
    assert [s.sample_id for s in batch.samples] == ["chat#0", "chat#1", "plain#0"]  # the flat group's kept
    assert (batch.objective, batch.temperature) == ("policy_gradient", TEMPERATURE)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    every_advantage = []
    for sample in batch.samples:
        prompt_id = sample.sample_id.split("#")[0]
        assert (
            sample.prompt_ids == inputs.prompt_ids[prompt_id] != teacher_prompts[prompt_id]
        )  # the student's
        assert sample.advantage == 0.0 and len(sample.token_advantages) == len(sample.completion_ids)
        expected = reference_logprobs(
            model, teacher_prompts[prompt_id], sample.completion_ids
        ) - torch.tensor(sample.behaviour_logprobs, dtype=torch.float64)
        torch.testing.assert_close(
            torch.tensor(sample.token_advantages, dtype=torch.float64), expected, atol=2e-4, rtol=0
        )
        every_advantage += sample.token_advantages
    # The teacher's context changes its log-probs: the advantages are not the ~0 of the test below.
    assert max(map(abs, every_advantage)) > 1e-2
    reverse_kl = -sum(every_advantage) / len(every_advantage)
    assert built.extra["distill_reverse_kl"] == pytest.approx(reverse_kl, abs=1e-9)


def test_the_student_as_its_own_teacher_in_its_own_context_gives_zero_advantages(job, scored, teacher):
    cfg, inputs = job
    built = distillation_batch(
        cfg, 0, scored, POLICY_VERSION, teacher.batch_token_logprobs, inputs.prompt_ids
    )
    advantages = [a for sample in built.batch.samples for a in sample.token_advantages]
    assert len(advantages) == sum(len(s.rollout.completion_ids) for s in scored[:3])
    assert max(map(abs, advantages)) < 1e-4  # the engine's float32 sampling vs one float32 forward
    assert abs(built.extra["distill_reverse_kl"]) < 1e-5


def test_a_step_with_only_stale_rollouts_trains_nothing(job, scored, teacher):
    cfg, inputs = job
    teacher_prompts = inputs.teachers[0].prompt_ids
    built = distillation_batch(
        cfg, 0, scored, POLICY_VERSION + 5, teacher.batch_token_logprobs, teacher_prompts
    )
    assert built.batch.samples == [] and built.stale_dropped == len(scored)
    assert "distill_reverse_kl" not in built.extra  # no token to average over


def test_a_shared_prompt_runs_once_and_scores_as_whole_sequences_do(tiny_model_dir):
    """The teacher's prefix sharing (the prompt's KV cache extended by each completion) against
    whole-sequence forwards: ragged completions, one of length 1, a group larger than batch_size."""
    teacher = Teacher(str(tiny_model_dir), dtype="float32", batch_size=2)
    prompt_a, prompt_b = [5, 9, 14, 2], [7, 3]
    sequences = [(prompt_a, [4, 8, 15]), (prompt_b, [16]), (prompt_a, [23, 42]), (prompt_a, [1, 2, 3, 4, 5])]
    calls = []
    decoder = teacher.decoder.forward
    teacher.decoder.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or decoder(*a, **k)
    shared = teacher.batch_token_logprobs(sequences, TEMPERATURE)
    # prompt_a: its prompt, then 2 completions (each but its last token); again for the third.
    # prompt_b: its prompt only (a completion of one token is predicted by the prompt).
    assert [tuple(shape) for shape in calls] == [(1, 4), (2, 2), (1, 4), (1, 4), (1, 2)]
    whole = teacher._whole_sequences(sequences, TEMPERATURE)
    assert [len(row) for row in shared] == [3, 1, 2, 5]
    for got, expected in zip(shared, whole):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
