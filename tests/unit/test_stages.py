"""Stages of one job: the schedule over global steps, sft demonstrations tokenized so the loss is
on the assistant turn only, their batches a function of the step, and bad stage data refused
before any actor starts, naming file, line and field."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from core.config import ConfigError
from core.model_store import ensure_default_model
from services.cli import app
from services.config import load_config
from services.orchestrator.data import DatasetError
from services.orchestrator.demonstrations import load_demonstrations
from services.orchestrator.stages import StagePlan, demonstration_batch

CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\nAnswer: 5"},
]


def write_job(tmp_path, stages: str, extra: str = "") -> object:
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1="}) + "\n")
    (tmp_path / "grader.py").write_text("def grade(sample, item):\n    return 1.0\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: train.jsonl}}\nreward: {{grader: {{source: grader.py}}}}\nstages: {stages}\n{extra}"
    )
    return path


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_default_model())


def test_the_stages_are_a_schedule_over_the_jobs_steps(tmp_path):
    write_jsonl(tmp_path / "demos.jsonl", [{"messages": CHAT}])
    cfg = load_config(
        write_job(tmp_path, "[{kind: sft, steps: 2, data: demos.jsonl}, {kind: grpo, steps: 3}]")
    )
    assert cfg.steps == 5 and cfg.stages[0].data == str(tmp_path / "demos.jsonl")  # relative to the file
    plan = StagePlan(cfg)
    assert [plan.of(step).label for step in range(5)] == ["stage 1 (sft)"] * 2 + ["stage 2 (grpo)"] * 3
    assert [plan.generates(step) for step in range(5)] == [False, False, True, True, True]
    assert [stage.first_step for stage in plan.stages] == [0, 2]
    single = StagePlan(load_config(write_job(tmp_path, "null", "steps: 4\n")))
    assert [(s.kind, s.first_step, s.config.steps) for s in single.stages] == [("grpo", 0, 4)]


@pytest.mark.parametrize(
    "stages, extra, message",
    [
        ("[{kind: sft, steps: 2}]", "", "stage kind sft needs data"),
        (
            "[{kind: grpo, steps: 2, data: demos.jsonl}]",
            "",
            "stage kind grpo takes its prompts from data.train",
        ),
        ("[{kind: grpo, steps: 2}]", "steps: 5\n", "steps=5, but the stages have 2"),
        ("[{kind: ppo, steps: 2}]", "", "stages.0.kind"),
        ("[{kind: dpo, steps: 2}]", "", "stage kind dpo needs data: a JSONL file of preference pairs"),
        ("[{kind: dpo, steps: 2, online: true, data: d.jsonl}]", "", r"dpo \(online\) takes its prompts"),
        ("[{kind: grpo, steps: 2, min_reward: 1}]", "", "min_reward is for rejection_sft stages, not grpo"),
        ("[{kind: sft, steps: 2, data: d.jsonl, online: true}]", "", "online is for dpo stages"),
        ("[{kind: distill, steps: 1}]", "", "stage kind distill needs teacher"),
        (
            "[{kind: grpo, steps: 1, teacher: {system_prompt: x}}]",
            "",
            "teacher is for distill stages, not grpo",
        ),
        ("[{kind: distill, steps: 1, teacher: {}}]", "", "the job's own model with the student's own prompt"),
        ("[{kind: distill, steps: 1, teacher: {system_prompt: x, batch_size: 0}}]", "", "teacher.batch_size"),
        ("[{kind: distill, steps: 1, teacher: {temperature: 1}}]", "", "teacher.temperature: unknown field"),
        (
            "[{kind: distill, steps: 1, teacher: {system_prompt: x}}]",
            "rollout: {environment: {type: tools, path: tools.py}}\n",
            "distill is single-turn only",
        ),
    ],
)
def test_bad_stages_are_named(tmp_path, stages, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_job(tmp_path, stages, extra))


def test_a_chat_demonstration_trains_the_assistant_turn_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"id": "d0", "messages": CHAT}])
    [demonstration] = load_demonstrations(path, tokenizer, max_prompt_tokens=256)
    prompt = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(demonstration.prompt_ids) == prompt
    completion = tokenizer.decode(demonstration.completion_ids)
    # Exactly what the template adds for the assistant message: its content and end of turn.
    assert prompt + completion == whole and completion.startswith(CHAT[-1]["content"])
    assert "What is 2 + 3?" not in completion and tokenizer.eos_token in completion


def test_a_prompt_completion_demonstration_ends_with_the_end_of_sequence(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "2 + 3 =", "completion": " 5"}])
    [demonstration] = load_demonstrations(path, tokenizer, max_prompt_tokens=256)
    assert demonstration.prompt_ids == tokenizer("2 + 3 =")["input_ids"]
    assert demonstration.completion_ids == tokenizer(" 5", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": CHAT[:-1]}, r"demos.jsonl:2: field 'messages' has no assistant turn to learn"),
        ({"prompt": "2 + 3 ="}, r"demos.jsonl:2: field 'completion' must be a non-empty string"),
        ({"messages": [{"role": "user"}]}, r"demos.jsonl:2: field 'messages' must be a list"),
    ],
)
def test_a_bad_demonstration_names_its_line_and_field(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(DatasetError, match=message):
        load_demonstrations(path, tokenizer, max_prompt_tokens=256)


def test_rft_run_refuses_bad_stage_data_before_any_actor_starts(tmp_path, tiny_model_dir):
    import ray

    write_jsonl(tmp_path / "demos.jsonl", [{"messages": CHAT}, {"messages": CHAT[:1]}])
    config = write_job(tmp_path, "[{kind: sft, steps: 1, data: demos.jsonl}, {kind: grpo, steps: 1}]")
    result = CliRunner().invoke(
        app, ["run", str(config), "-o", f"run_root={tmp_path}/runs", "-o", f"model.path={tiny_model_dir}"]
    )
    assert result.exit_code == 2, result.output
    assert "demos.jsonl:2: field 'messages' has no assistant turn" in result.output
    assert not ray.is_initialized()


def test_demonstration_batches_are_a_function_of_the_step_and_cover_each_pass(tmp_path, tokenizer):
    rows = [{"id": f"d{i}", "prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(5)]
    demonstrations = load_demonstrations(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 256)
    config = "[{kind: grpo, steps: 1}, {kind: sft, steps: 5, data: d.jsonl, batch_size: 2}]"
    stage = StagePlan(load_config(write_job(tmp_path, config))).of(1)
    batches = [
        demonstration_batch(stage, step, demonstrations, seed=0, policy_version=step) for step in range(1, 6)
    ]
    assert all(batch.objective == "sft" and len(batch.samples) == 2 for batch in batches)
    taken = [sample.sample_id.split("@")[0] for batch in batches for sample in batch.samples]
    assert Counter(taken[:5]) == Counter(taken[5:]) == Counter(f"d{i}" for i in range(5))  # each once a pass
    assert taken[:5] != taken[5:]  # a new order each pass
    again = demonstration_batch(stage, 3, demonstrations, seed=0, policy_version=3)  # a resumed step
    assert [s.sample_id for s in again.samples] == [s.sample_id for s in batches[2].samples]
    assert len({s.sample_id for batch in batches for s in batch.samples}) == 10
