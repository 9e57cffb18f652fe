"""Shared by the showcase generators (tool_calling/, text_to_sql/): deterministic train and
held-out splits whose prompts never repeat across or within splits, written as JSONL."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable


def unique_items(
    make_item: Callable[[random.Random], dict],
    count: int,
    seed: int,
    prefix: str,
    exclude: set[str] = frozenset(),
    max_tries_per_item: int = 200,
) -> list[dict]:
    """`count` items from make_item(rng) (a dict with "messages"), skipping any whose prompt text
    was already made or is in `exclude`; ids are f"{prefix}-00000", ... in order."""
    rng = random.Random(seed)
    items, seen, tries = [], set(exclude), 0
    while len(items) < count:
        tries += 1
        if tries > max_tries_per_item * count:
            raise RuntimeError(
                f"only {len(items)} distinct prompts after {tries} tries; the templates cannot make {count}"
            )
        item = make_item(rng)
        prompt = prompt_text(item)
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append({"id": f"{prefix}-{len(items):05d}", **item})
    return items


def prompt_text(item: dict) -> str:
    return "\n".join(message["content"] for message in item["messages"])


def write_splits(
    make_item: Callable[[random.Random], dict], out: Path, train: int, heldout: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Held-out items first (seed + 1), then training items (seed) that avoid every held-out prompt."""
    heldout_items = unique_items(make_item, heldout, seed + 1, "heldout")
    train_items = unique_items(
        make_item, train, seed, "train", exclude={prompt_text(i) for i in heldout_items}
    )
    for name, items in (("train.jsonl", train_items), ("heldout.jsonl", heldout_items)):
        (out / name).write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(train_items)} train and {len(heldout_items)} held-out items to {out}")
    return train_items, heldout_items


def generator_main(
    make_item: Callable[[random.Random], dict], description: str, out: Path, seed: int
) -> None:
    """The generators' command line: --out, --train, --heldout, --seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args()
    write_splits(make_item, args.out, args.train, args.heldout, args.seed)
