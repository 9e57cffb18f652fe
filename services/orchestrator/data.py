"""Datasets: items validated row by row (JSONL, or a local parquet file / Hugging Face `datasets`
save_to_disk directory, with `data.fields` mapping item fields onto columns), and the deterministic
order prompts are drawn in. Only local paths: nothing is fetched from a hub."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and line."""


def json_lines(path: str | Path, what: str = "dataset") -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) for every non-blank line of a JSONL file; a line that is not a JSON
    object stops with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    with path.open() as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: each line must be a JSON object")
            yield where, record


def load_items(path: str | Path, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Read `{"id", "messages" | "prompt", ...}` items; any bad row stops with its line or index.
    `fields` ({item field: dataset column}) renames columns first (README "Dataset format")."""
    items, seen_ids = [], set()
    for where, row in dataset_rows(path):
        item = map_fields(row, fields, where) if fields else row
        if "id" not in item:
            raise DatasetError(f"{where}: missing field 'id'")
        item["id"] = str(item["id"])
        if item["id"] in seen_ids:
            raise DatasetError(f"{where}: duplicate id {item['id']!r}")
        seen_ids.add(item["id"])
        _check_prompt(item, where)
        items.append(item)
    if not items:
        raise DatasetError(f"{path}: no items")
    return items


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def dataset_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row: `file:line` of a JSONL file, `path row N` (0-based, as
    `datasets` counts) of a parquet file or save_to_disk directory, whose rows get their index as
    `id` when they have none."""
    path = Path(path)
    if path.is_dir():
        rows = _disk_dataset_rows(path)
    elif path.is_file() and path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.is_file() and path.suffix in JSONL_SUFFIXES:
        yield from json_lines(path)
        return
    elif not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    else:
        raise DatasetError(
            f"{path}: not a dataset format rft reads: a JSONL file ({', '.join(JSONL_SUFFIXES)}), "
            "a .parquet file, or a directory written by datasets' save_to_disk"
        )
    for index, row in enumerate(rows):
        yield f"{path} row {index}", (row if "id" in row else {"id": str(index), **row})


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as e:
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None


def _disk_dataset_rows(path: Path) -> Iterator[dict[str, Any]]:
    """A `Dataset.save_to_disk` directory (memory-mapped, read in place); a DatasetDict's
    directory holds one per split, which must be named."""
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text()).get("splits", [])
        raise DatasetError(
            f"{path} holds the splits {splits} (a DatasetDict): give one, e.g. {path / splits[0]}"
            if splits
            else f"{path} is an empty DatasetDict"
        )
    if not (path / "state.json").is_file():
        raise DatasetError(
            f"{path} is a directory but not one written by datasets' save_to_disk (no state.json)"
        )
    from datasets import load_from_disk

    return iter(load_from_disk(str(path)))


def map_fields(row: dict[str, Any], fields: dict[str, str], where: str) -> dict[str, Any]:
    """The row with each mapped column moved to its item field (dotted = nested, e.g.
    `reward_model.ground_truth`); unmapped columns stay, as extra fields of the item."""
    item = {name: value for name, value in row.items() if name not in fields.values()}
    for target, column in fields.items():
        if row.get(column) is None:  # a parquet/arrow row has every column, a missing value is null
            state = "is null" if column in row else "is missing"
            raise DatasetError(f"{where}: field {column!r} {state} (data.fields maps {target!r} to it)")
        *parents, leaf = target.split(".")
        node = item
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DatasetError(f"{where}: data.fields {target!r}: {part!r} is not a mapping")
        node[leaf] = row[column]
    return item


def _check_prompt(item: dict[str, Any], where: str) -> None:
    messages, prompt = item.get("messages"), item.get("prompt")
    if messages is None and prompt is None:
        raise DatasetError(f"{where}: needs 'messages' (chat) or 'prompt' (plain text)")
    if prompt is not None and not isinstance(prompt, str):
        raise DatasetError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        check_messages(messages, where)


def check_messages(messages: Any, where: str) -> None:
    """A non-empty list of {'role': str, 'content': str}; else a DatasetError naming the message."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DatasetError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}")


def chat_template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding


def item_prompt_ids(item: dict[str, Any], tokenizer) -> list[int]:
    """Chat items go through the model's chat template; plain prompts are tokenized as they are."""
    if item.get("messages") is not None:
        return chat_template_ids(tokenizer, item["messages"], generation_prompt=True)
    return list(tokenizer(item["prompt"], add_special_tokens=True)["input_ids"])


def prompt_token_ids(item: dict[str, Any], tokenizer, max_prompt_tokens: int) -> list[int]:
    """The item's prompt ids (`item_prompt_ids`), at most `max_prompt_tokens` of them."""
    ids = item_prompt_ids(item, tokenizer)
    if len(ids) > max_prompt_tokens:
        raise DatasetError(
            f"item {item['id']}: prompt has {len(ids)} tokens > data.max_prompt_tokens={max_prompt_tokens}"
        )
    return ids


@dataclass
class PromptOrder:
    """Which training item comes next: each epoch is a fresh permutation seeded by (seed, epoch),
    so the order is a pure function of the cursor — saved in checkpoints, reproduced on resume."""

    num_items: int
    seed: int
    cursor: int = 0
    # The last epoch's permutation: prompts are taken a few at a time (or one by one, through the
    # difficulty filter), and shuffling the whole dataset for each take would cost O(items).
    _epoch: tuple[int, list[int]] | None = field(default=None, repr=False, compare=False)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(range(self.num_items))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._epoch = (epoch, order)
        return self._epoch[1]

    def take(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            epoch, offset = divmod(self.cursor, self.num_items)
            chunk = self._epoch_order(epoch)[offset : offset + count - len(indices)]
            indices += chunk
            self.cursor += len(chunk)
        return indices
