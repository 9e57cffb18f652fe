"""The demo's data: what generate.py writes, and the wordings each split may and may not use."""

import importlib.util
import json
import re
from pathlib import Path

DATA = Path(__file__).parents[2] / "examples" / "arithmetic"
spec = importlib.util.spec_from_file_location("arithmetic_generate", DATA / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

SPLITS = ["train.jsonl", "heldout.jsonl", "heldout_paraphrased.jsonl"]


def items(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def skeleton(item: dict) -> str:
    """The wording without its numbers, names and things: which template (and instruction) it is."""
    text = re.sub(r"\d+", "N", item["messages"][0]["content"])
    for word in generate.NAMES + generate.THINGS:
        text = re.sub(rf"\b{word}\b", "X", text)
    return text


def test_committed_data_is_what_generate_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["generate.py", "--out", str(tmp_path)])
    generate.main()
    for name in SPLITS:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name


def test_training_mixes_wordings_and_never_uses_the_paraphrased_ones():
    train, heldout, paraphrased = (items(name) for name in SPLITS)
    train_wordings = {skeleton(item) for item in train}
    # Every template of every kind, each with each instruction (or none): 4 kinds x 3 x 3.
    assert len(train_wordings) == 36
    assert not train_wordings & {skeleton(item) for item in paraphrased}
    # The held-out set uses the first template and the full instruction, which training also uses.
    assert {skeleton(item) for item in heldout} <= train_wordings
    assert all(generate.INSTRUCTION in item["messages"][0]["content"] for item in heldout)
    assert not any("Answer" in item["messages"][0]["content"] for item in paraphrased)
    assert [item["reward_model"] for item in paraphrased] == [item["reward_model"] for item in heldout]


def test_held_out_problems_are_not_trained_on():
    train, heldout = generate.train_and_heldout(2000, 300, seed=1234)
    problems = [{tuple(sorted(problem.items())) for problem, _ in split} for split in (train, heldout)]
    assert len(problems[0]) == 2000 and not problems[0] & problems[1]
