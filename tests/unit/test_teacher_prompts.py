"""A distill stage's teacher, before any actor starts (its config's refusals are in
test_stages.py): its paths relative to the config file, a saved config loading again, its prompt
of each item (system prompt and few-shot conversations before the item's own, the chat template's
rendering of the whole conversation), bad few-shot files named by file, line and field, and a
teacher whose tokenizer is not the student's refused."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from core.config import ConfigError
from core.model_store import ensure_default_model
from services.cli import app
from services.config import dump_config, load_config
from services.orchestrator.data import DatasetError
from services.orchestrator.setup import prepare_inputs
from services.orchestrator.teachers import load_few_shot

FEW_SHOT = [
    {
        "messages": [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "Answer: 2"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 5?"},
            {"role": "assistant", "content": "Answer: 7"},
        ]
    },
]
ITEMS = [
    {"id": "chat", "messages": [{"role": "user", "content": "What is 3 + 4?"}]},
    {
        "id": "own-system",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 6 + 1?"},
        ],
    },
    {"id": "plain", "prompt": "3 + 4 ="},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_job(tmp_path, model_dir, stages: str, extra: str = ""):
    write_jsonl(tmp_path / "train.jsonl", ITEMS)
    (tmp_path / "grader.py").write_text("def grade(sample, item):\n    return 1.0\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        f"model: {{path: {model_dir}}}\ndata: {{train: train.jsonl}}\n"
        f"reward: {{grader: {{source: grader.py}}}}\nstages: {stages}\n{extra}"
    )
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_default_model())


def test_a_distill_jobs_saved_config_loads_again(tmp_path, tiny_model_dir):
    """--resume reads the run's config.yaml, which holds every field of every stage."""
    stages = "[{kind: distill, steps: 1, teacher: {system_prompt: x}}, {kind: grpo, steps: 1}]"
    cfg = load_config(write_job(tmp_path, tiny_model_dir, stages))
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg


def test_the_teachers_prompts_are_the_chat_template_of_its_whole_conversation(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "few.jsonl", FEW_SHOT)
    teacher = """{system_prompt: "Answer with 'Answer: N'.", few_shot: few.jsonl}"""
    cfg = load_config(
        write_job(tmp_path, tiny_model_dir, f"[{{kind: distill, steps: 1, teacher: {teacher}}}]")
    )
    assert cfg.stages[0].teacher.few_shot == str(tmp_path / "few.jsonl")  # relative to the config file
    inputs = prepare_inputs(cfg)
    teacher_inputs = inputs.teachers[0]
    assert teacher_inputs.model_path == inputs.model_path  # no teacher.model: the job's own
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [m for row in FEW_SHOT for m in row["messages"]]
    system = "Answer with 'Answer: N'."
    expected = {
        "chat": [{"role": "system", "content": system}, *examples, *ITEMS[0]["messages"]],
        # The item's own system message joins the teacher's at the front.
        "own-system": [
            {"role": "system", "content": f"{system}\n\nBe brief."},
            *examples,
            ITEMS[1]["messages"][1],
        ],
    }
    for item_id, conversation in expected.items():
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(teacher_inputs.prompt_ids[item_id]) == rendered
        assert "What is 2 + 5?" in rendered and rendered.endswith("<|im_start|>assistant\n")
    plain = f"{system}\n\nWhat is 1 + 1?\nAnswer: 2\n\nWhat is 2 + 5?\nAnswer: 7\n\n3 + 4 ="
    assert tokenizer.decode(teacher_inputs.prompt_ids["plain"], skip_special_tokens=True) == plain
    # The student's prompts are the items' own.
    assert tokenizer.decode(inputs.prompt_ids["plain"], skip_special_tokens=True) == "3 + 4 ="
    assert "What is 2 + 5?" not in tokenizer.decode(inputs.prompt_ids["chat"])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "1+1="}, "few.jsonl:2: field 'messages' is missing"),
        ({"messages": "hi"}, "few.jsonl:2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"few.jsonl:2: messages\[0\] must be"),
        (
            {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
            r"few.jsonl:2: messages\[0\].role is 'system'",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "few.jsonl:2: field 'messages' has no assistant"),
    ],
)
def test_a_bad_few_shot_row_names_its_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "few.jsonl", [FEW_SHOT[0], row])
    with pytest.raises(DatasetError, match=message):
        load_few_shot(path, "stages[0].teacher.few_shot")


def test_a_missing_or_empty_few_shot_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"stages\[1\].teacher.few_shot not found: .*nope.jsonl"):
        load_few_shot(str(tmp_path / "nope.jsonl"), "stages[1].teacher.few_shot")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl has no conversations"):
        load_few_shot(str(tmp_path / "empty.jsonl"), "stages[1].teacher.few_shot")


def test_rft_run_refuses_a_bad_few_shot_file_before_any_actor_starts(tmp_path, tiny_model_dir):
    import ray

    write_jsonl(tmp_path / "few.jsonl", [FEW_SHOT[0], {"messages": [{"role": "user", "content": "x"}]}])
    stages = "[{kind: grpo, steps: 1}, {kind: distill, steps: 1, teacher: {few_shot: few.jsonl}}]"
    config = write_job(tmp_path, tiny_model_dir, stages)
    result = CliRunner().invoke(app, ["run", str(config), "-o", f"run_root={tmp_path}/runs"])
    assert result.exit_code == 2, result.output
    assert "few.jsonl:2: field 'messages' has no assistant turn" in result.output
    assert not ray.is_initialized()


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["東京"])  # one more token, and the probe's text tokenizes differently
    tokenizer.save_pretrained(other)
    stages = "[{kind: distill, steps: 1, teacher: {model: other-teacher}}]"
    cfg = load_config(write_job(tmp_path, tiny_model_dir, stages))
    assert cfg.stages[0].teacher.model == str(other)  # relative to the config file
    with pytest.raises(
        ConfigError, match=r"stages\[0\].teacher.model: the teacher's tokenizer is not the student's"
    ):
        prepare_inputs(cfg)
    missing = load_config(write_job(tmp_path, tiny_model_dir, stages.replace("other-teacher", "gone")))
    with pytest.raises(FileNotFoundError, match=r"stages\[0\].teacher.model: gone is not a directory"):
        prepare_inputs(missing)


def test_a_teacher_prompt_longer_than_the_teachers_positions_is_refused(tmp_path, tiny_model_dir):
    long_example = {
        "messages": [{"role": "user", "content": "1 + 1? " * 200}, {"role": "assistant", "content": "2"}]
    }
    write_jsonl(tmp_path / "few.jsonl", [long_example])
    stages = "[{kind: distill, steps: 1, teacher: {few_shot: few.jsonl}}]"
    with pytest.raises(ConfigError, match="exceeds the teacher's 512 positions"):
        prepare_inputs(load_config(write_job(tmp_path, tiny_model_dir, stages)))
