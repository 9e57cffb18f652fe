"""Datasets: JSONL items validated line by line, and the deterministic order prompts are drawn in."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
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


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """Read `{"id", "messages" | "prompt", ...}` items; any bad line stops with its line number."""
    items, seen_ids = [], set()
    for where, item in json_lines(path):
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


def _check_prompt(item: dict[str, Any], where: str) -> None:
    messages, prompt = item.get("messages"), item.get("prompt")
    if messages is None and prompt is None:
        raise DatasetError(f"{where}: needs 'messages' (chat) or 'prompt' (plain text)")
    if prompt is not None and not isinstance(prompt, str):
        raise DatasetError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DatasetError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}")


def prompt_token_ids(item: dict[str, Any], tokenizer, max_prompt_tokens: int) -> list[int]:
    """Chat items go through the model's chat template; plain prompts are tokenized as they are."""
    if item.get("messages") is not None:
        ids = tokenizer.apply_chat_template(item["messages"], tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(item["prompt"], add_special_tokens=True)["input_ids"]
    ids = list(ids)
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

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            epoch, offset = divmod(self.cursor, self.num_items)
            chunk = self._epoch_order(epoch)[offset : offset + count - len(indices)]
            indices += chunk
            self.cursor += len(chunk)
        return indices
