"""The showcase tasks under examples/ (tool_calling, text_to_sql): their job configs load, their
datasets parse, are reproducible from their generators and keep held-out prompts out of training,
and their graders, run in the real sandbox, give the reference answer full reward and wrong
answers less."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reward_workers.config import RewardConfig
from reward_workers.pool import score_locally
from rollout_workers.interface import Rollout
from services.cli.main import load_grader_spec
from services.config import load_config
from services.orchestrator.data import load_items

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASKS = ["tool_calling", "text_to_sql"]


def prompt(item: dict) -> str:
    return "\n".join(message["content"] for message in item["messages"])


@pytest.mark.parametrize("task", TASKS)
def test_config_loads_with_the_task_grader_and_data(task):
    cfg = load_config(EXAMPLES / f"{task}.yaml")
    assert Path(cfg.data.train) == EXAMPLES / task / "train.jsonl"
    assert Path(cfg.data.heldout) == EXAMPLES / task / "heldout.jsonl"
    # The job inlines its grader; the spec file `rft eval --grader` takes must say the same.
    assert cfg.reward.grader == load_grader_spec(str(EXAMPLES / task / "grader.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_datasets_parse_and_heldout_prompts_never_in_train(task):
    train, heldout = (
        load_items(EXAMPLES / task / "train.jsonl"),
        load_items(EXAMPLES / task / "heldout.jsonl"),
    )
    assert (len(train), len(heldout)) == (1000, 300)
    train_prompts, heldout_prompts = {prompt(i) for i in train}, {prompt(i) for i in heldout}
    assert len(train_prompts) == len(train) and len(heldout_prompts) == len(heldout)
    assert not train_prompts & heldout_prompts


@pytest.mark.parametrize("task", TASKS)
def test_generator_reproduces_the_committed_data(task, tmp_path):
    subprocess.run(
        [sys.executable, str(EXAMPLES / task / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / task / name).read_bytes(), name


def test_prompts_fit_the_prompt_budget():
    from transformers import AutoTokenizer

    from core.model_store import ensure_default_model
    from services.orchestrator.data import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    for task in TASKS:
        cfg = load_config(EXAMPLES / f"{task}.yaml")
        for path in (cfg.data.train, cfg.data.heldout):
            longest = sorted(load_items(path), key=lambda item: len(prompt(item)))[-20:]  # by characters
            for item in longest:
                prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens)  # raises past the budget


def score(task: str, answers: list[tuple[dict, str]]) -> list:
    """Grade (item, reply) pairs with the task's job grader in the real sandbox."""
    cfg = load_config(EXAMPLES / f"{task}.yaml")
    rollouts = [Rollout(item["id"], k, [], [], [], 0, "stop", text) for k, (item, text) in enumerate(answers)]
    items = {item["id"]: item for item, _ in answers}
    scored = score_locally(RewardConfig(grader=cfg.reward.grader), rollouts, items)
    assert [s.grader_error for s in scored] == [None] * len(scored)
    return [s.reward for s in scored]


def first(items: list[dict], predicate) -> dict:
    return next(item for item in items if predicate(item))


def test_tool_calling_grader_rewards_the_reference_answer_and_not_wrong_ones():
    heldout = load_items(EXAMPLES / "tool_calling" / "heldout.jsonl")
    truth = lambda item: item["reward_model"]["ground_truth"]
    call = first(heldout, lambda i: len(truth(i).get("arguments", {})) >= 2)
    clarify = first(heldout, lambda i: truth(i) == {"clarifying_question": True})
    refuse = first(heldout, lambda i: truth(i) == {"refusal": True})
    name, arguments = truth(call)["name"], truth(call)["arguments"]
    wrong_argument = {**arguments, next(iter(arguments)): "something else"}
    other_tool = first([t["name"] for t in call["tools"]], lambda t: t != name)
    rewards = score(
        "tool_calling",
        [
            (call, json.dumps(truth(call))),
            (clarify, "Which one do you mean?"),
            (refuse, "Sorry, I cannot do that with these tools."),
            (call, json.dumps({"name": name, "arguments": wrong_argument})),
            (call, json.dumps({"name": other_tool, "arguments": arguments})),
            (call, f"Sure! {json.dumps(truth(call))}"),  # right call, wrapped in prose
            (clarify, json.dumps({"name": clarify["tools"][0]["name"], "arguments": {}})),
            (refuse, json.dumps({"name": refuse["tools"][0]["name"], "arguments": {}})),
        ],
    )
    assert rewards[:3] == [1.0, 1.0, 1.0]
    wrong_arg, wrong_tool, in_prose, clarify_call, refuse_call = rewards[3:]
    assert 0.0 < wrong_arg < 1.0  # partial credit: right function, one argument wrong
    assert wrong_tool == pytest.approx(0.2)  # only the clean-reply credit
    assert in_prose == pytest.approx(0.8)  # the call is right, the reply is not only JSON
    assert clarify_call < 1.0 and refuse_call < 1.0


def test_text_to_sql_grader_rewards_the_reference_query_and_not_wrong_ones():
    heldout = load_items(EXAMPLES / "text_to_sql" / "heldout.jsonl")
    ordered = first(heldout, lambda i: i["order_matters"])
    counting = first(
        heldout,
        lambda i: (
            "COUNT(*) FROM" in i["reward_model"]["ground_truth"]
            and "GROUP" not in i["reward_model"]["ground_truth"]
        ),
    )
    fenced = lambda query: f"```sql\n{query}\n```"
    reference = lambda item: item["reward_model"]["ground_truth"]
    rewards = score(
        "text_to_sql",
        [
            (ordered, fenced(reference(ordered))),
            (counting, f"Here it is:\n{fenced(reference(counting))}"),
            (ordered, fenced(reference(ordered).replace("DESC", "ASC"))),  # the wrong end of the table
            (counting, fenced(f"SELECT COUNT(*) + 1 FROM {next(iter(counting['database']['rows']))};")),
            (counting, reference(counting)),  # right query, not in a ```sql block
            (counting, fenced("SELECT * FROM no_such_table;")),
        ],
    )
    assert rewards[:2] == [1.0, 1.0]
    assert rewards[2:4] == [pytest.approx(0.2)] * 2  # the format credit only
    assert rewards[4] == pytest.approx(0.8)
    assert rewards[5] == pytest.approx(0.2)
