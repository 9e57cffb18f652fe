"""Datasets beside JSONL: a parquet file and a `datasets` save_to_disk directory, read through the
job's data loader with a `data.fields` mapping, give the same items as the equivalent JSONL."""

from __future__ import annotations

import json

import pytest

from core.config import ConfigError
from services.config import load_config
from services.orchestrator.data import DatasetError, load_items

COLUMNS = {
    "question": ["What is 2 + 3?", "Name a prime above 10.", "What is 7 * 6?"],
    "solution": ["5", "11", "42"],
    "level": [1, 2, 1],
}
FIELDS = {"prompt": "question", "reward_model.ground_truth": "solution"}
# What the rows are as items in the job's JSONL format (ids: the row index).
EQUIVALENT_JSONL = [
    {"id": str(i), "prompt": q, "reward_model": {"ground_truth": s}, "level": level}
    for i, (q, s, level) in enumerate(zip(*COLUMNS.values()))
]


def save_dataset(tmp_path, fmt: str, columns: dict = COLUMNS):
    from datasets import Dataset

    dataset = Dataset.from_dict(columns)
    if fmt == "parquet":
        path = tmp_path / "train.parquet"
        dataset.to_parquet(str(path))
    else:
        path = tmp_path / "train_dir"
        dataset.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk"])
def test_mapped_dataset_equals_its_jsonl(tmp_path, fmt):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in EQUIVALENT_JSONL))
    assert load_items(save_dataset(tmp_path, fmt), FIELDS) == load_items(jsonl)


def test_chat_rows_with_ids_keep_them(tmp_path):
    columns = {
        "qid": ["a", "b"],
        "conversation": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2+2?"}]],
        "answer": ["hello", "4"],
    }
    items = load_items(
        save_dataset(tmp_path, "parquet", columns),
        {"id": "qid", "messages": "conversation", "reward_model.ground_truth": "answer"},
    )
    chat = lambda text: [{"role": "user", "content": text}]
    assert items == [
        {"id": "a", "messages": chat("hi"), "reward_model": {"ground_truth": "hello"}},
        {"id": "b", "messages": chat("2+2?"), "reward_model": {"ground_truth": "4"}},
    ]


def test_the_mapping_applies_to_jsonl_too(tmp_path):
    jsonl = tmp_path / "raw.jsonl"
    jsonl.write_text(json.dumps({"id": 7, "question": "1+1?", "solution": "2"}) + "\n")
    assert load_items(jsonl, FIELDS) == [{"id": "7", "prompt": "1+1?", "reward_model": {"ground_truth": "2"}}]


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk"])
def test_a_missing_or_null_mapped_field_names_row_and_field(tmp_path, fmt):
    path = save_dataset(tmp_path, fmt)
    with pytest.raises(DatasetError, match=r"row 0: field 'query' is missing \(data.fields maps 'prompt'"):
        load_items(path, {"prompt": "query"})
    with_null = {**COLUMNS, "solution": ["5", "11", None]}
    path = save_dataset(tmp_path / "null", fmt, with_null)
    with pytest.raises(DatasetError, match=r"row 2: field 'solution' is null .*'reward_model.ground_truth'"):
        load_items(path, FIELDS)


def test_unmapped_rows_are_checked_like_jsonl_items(tmp_path):
    with pytest.raises(DatasetError, match=r"train\.parquet row 0: needs 'messages' \(chat\) or 'prompt'"):
        load_items(save_dataset(tmp_path, "parquet"))


def test_paths_that_are_no_dataset_are_named(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("question,solution\n")
    with pytest.raises(DatasetError, match=r"train\.csv: not a dataset format rft reads"):
        load_items(csv)
    with pytest.raises(DatasetError, match=r"not one written by datasets' save_to_disk"):
        load_items(tmp_path)
    with pytest.raises(DatasetError, match=r"dataset not found: .*nope\.parquet"):
        load_items(tmp_path / "nope.parquet")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DatasetError, match=r"fake\.parquet: not a readable parquet file"):
        load_items(fake)


def test_a_dataset_dict_directory_asks_for_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict(COLUMNS), "test": Dataset.from_dict(COLUMNS)}).save_to_disk(
        str(tmp_path / "splits")
    )
    with pytest.raises(DatasetError, match=r"holds the splits \['train', 'test'\].*splits/train"):
        load_items(tmp_path / "splits", FIELDS)
    assert load_items(tmp_path / "splits" / "train", FIELDS) == EQUIVALENT_JSONL


def test_data_fields_in_a_job_config(tmp_path):
    save_dataset(tmp_path, "parquet")
    (tmp_path / "grader.py").write_text("def grade(sample, item):\n    return 1.0\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        "data:\n  train: train.parquet\n  fields: {prompt: question, reward_model.ground_truth: solution}\n"
        "reward:\n  grader:\n    source: grader.py\n"
    )
    cfg = load_config(config)
    assert load_items(cfg.data.train, cfg.data.fields) == EQUIVALENT_JSONL
    with pytest.raises(ConfigError, match=r"data\.fields: .*non-empty names"):
        load_config(config, ["data.fields={prompt: ''}"])
