"""Arithmetic a 135M model gets wrong in its head (3-digit products, sums of 3-4 large numbers,
mixed steps, word problems), to be solved with the `calculate` tool (tools.py).

    python examples/calculator_agent/generate.py   # writes train, heldout, heldout_paraphrased.jsonl

Each line: {"id", "messages": [system, user], "reward_model": {"ground_truth": "30681"},
"expression": "487 * 63"} (`expression`: the problem's arithmetic, for reading). The system
message explains the tool call format and the 'Answer: <number>' ending; the user message is
the problem. heldout_paraphrased.jsonl holds the held-out problems (same numbers, same answers)
worded with templates training never uses. Train, held-out and paraphrased ids are disjoint, and
no training problem has a held-out problem's arithmetic. Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED = 1000
SYSTEM = (
    "You can use a calculator. To use it, reply with only a tool call like\n"
    '<tool_call>{"name": "calculate", "arguments": {"expression": "12 * (3 + 4)"}}</tool_call>\n'
    "and the result comes back in the next message. It knows + - * / // % ** and parentheses.\n"
    "When you have the result, reply without a tool call and end with the final answer "
    "on its own line as 'Answer: <number>'."
)
NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Leo", "Maya", "Omar"]
THINGS = ["bottles", "pencils", "stickers", "cards", "marbles", "stamps", "shells", "buttons"]


@dataclass(frozen=True)
class Kind:
    draw: Callable[[random.Random], dict]  # the problem's values
    expression: str  # its arithmetic, formatted with the values
    answer: Callable[[dict], int]
    wordings: list[str]  # train and held-out
    paraphrases: list[str]  # heldout_paraphrased only


def _numbers(rng: random.Random) -> dict:
    numbers = [rng.randint(100, 9999) for _ in range(rng.choice([3, 4]))]
    return {
        "numbers": numbers,
        "plus": " + ".join(map(str, numbers)),
        "list": ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}",
    }


def _share(rng: random.Random) -> dict:
    n, k = rng.randint(12, 60), rng.randint(25, 400)
    return {"n": n, "k": k, "total": n * k, "t": rng.choice(THINGS)}


KINDS = {
    "product": Kind(
        lambda r: {"a": r.randint(100, 999), "b": r.randint(12, 99)},
        "{a} * {b}",
        lambda v: v["a"] * v["b"],
        ["What is {a} × {b}?", "Calculate {a} times {b}.", "How much is {a} multiplied by {b}?"],
        ["Find the product of {a} and {b}.", "Multiply {b} by {a}. What do you get?"],
    ),
    "sum": Kind(
        _numbers,
        "{plus}",
        lambda v: sum(v["numbers"]),
        ["What is {plus}?", "Calculate {plus}.", "Add up {plus}."],
        ["Find the total of these numbers: {list}.", "What do {list} sum to?"],
    ),
    "product_plus": Kind(
        lambda r: {"a": r.randint(12, 99), "b": r.randint(12, 99), "c": r.randint(100, 999)},
        "{a} * {b} + {c}",
        lambda v: v["a"] * v["b"] + v["c"],
        ["What is {a} × {b} + {c}?", "Calculate {a} times {b}, plus {c}."],
        ["Multiply {a} by {b}, then add {c}. What is the result?", "Add {c} to the product of {a} and {b}."],
    ),
    "product_minus": Kind(
        lambda r: {"a": r.randint(100, 999), "b": r.randint(12, 99), "c": r.randint(100, 999)},
        "{a} * {b} - {c}",
        lambda v: v["a"] * v["b"] - v["c"],
        ["What is {a} × {b} − {c}?", "Calculate {a} times {b}, minus {c}."],
        ["Take the product of {a} and {b} and subtract {c}.", "Subtract {c} from {a} multiplied by {b}."],
    ),
    "boxes": Kind(
        lambda r: {
            "a": r.randint(12, 99),
            "b": r.randint(24, 240),
            "c": r.randint(10, 99),
            "t": r.choice(THINGS),
        },
        "{a} * {b} + {c}",
        lambda v: v["a"] * v["b"] + v["c"],
        [
            "A shop has {a} boxes of {b} {t} each and {c} loose {t}. How many {t} does it have?",
            "There are {a} crates with {b} {t} in every crate, plus {c} more {t}. How many {t} in all?",
        ],
        ["Each of {a} boxes holds {b} {t}, and {c} {t} lie outside them. What is the total number of {t}?"],
    ),
    "share": Kind(
        _share,
        "{total} / {n}",
        lambda v: v["k"],
        [
            "{total} {t} are shared equally among {n} children. How many {t} does each child get?",
            "{n} friends split {total} {t} evenly. How many {t} does each friend get?",
        ],
        ["If {total} {t} are divided into {n} equal groups, how many {t} are in one group?"],
    ),
    "savings": Kind(
        lambda r: {
            "name": r.choice(NAMES),
            "a": r.randint(120, 990),
            "b": r.randint(12, 52),
            "c": r.randint(100, 999),
        },
        "{a} * {b} - {c}",
        lambda v: v["a"] * v["b"] - v["c"],
        [
            "{name} saves {a} dollars every week for {b} weeks, then spends {c} dollars. How much is left?",
            "{name} puts {a} dollars a week in a jar for {b} weeks, then takes out {c}. How much is in it?",
        ],
        ["Over {b} weeks {name} saved {a} dollars per week, then paid {c} dollars for a bike. What remains?"],
    ),
}


def make_problem(rng: random.Random) -> dict:
    """{"kind", "values", "expression", "answer"} for one random problem."""
    name = rng.choice(sorted(KINDS))
    kind = KINDS[name]
    values = kind.draw(rng)
    return {
        "kind": name,
        "values": values,
        "expression": kind.expression.format(**values),
        "answer": kind.answer(values),
    }


def to_item(problem: dict, rng: random.Random, item_id: str, paraphrased: bool = False) -> dict:
    kind = KINDS[problem["kind"]]
    wordings = kind.paraphrases if paraphrased else kind.wordings
    question = rng.choice(wordings).format(**problem["values"])
    return {
        "id": item_id,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "reward_model": {"ground_truth": str(problem["answer"])},
        "expression": problem["expression"],
    }


def problems(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` problems with distinct expressions, none in `exclude`."""
    rng, found, seen = random.Random(seed), [], set(exclude)
    while len(found) < count:
        problem = make_problem(rng)
        if problem["expression"] not in seen:
            seen.add(problem["expression"])
            found.append(problem)
    return found


def write(out: Path, train: int = 1000, heldout: int = 300, seed: int = SEED) -> dict[str, list[dict]]:
    heldout_problems = problems(heldout, seed + 1)
    train_problems = problems(train, seed, exclude={p["expression"] for p in heldout_problems})
    rng = random.Random(seed + 2)  # wordings
    splits = {
        "train.jsonl": [to_item(p, rng, f"train-{i:05d}") for i, p in enumerate(train_problems)],
        "heldout.jsonl": [to_item(p, rng, f"heldout-{i:05d}") for i, p in enumerate(heldout_problems)],
        "heldout_paraphrased.jsonl": [
            to_item(p, rng, f"paraphrased-{i:05d}", paraphrased=True) for i, p in enumerate(heldout_problems)
        ],
    }
    for name, items in splits.items():
        (out / name).write_text("".join(json.dumps(item) + "\n" for item in items))
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    splits = write(args.out, args.train, args.heldout, args.seed)
    print(", ".join(f"{len(items)} in {name}" for name, items in splits.items()), f"({args.out})")


if __name__ == "__main__":
    main()
