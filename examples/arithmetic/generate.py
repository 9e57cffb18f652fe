"""Arithmetic word problems, generated deterministically from a seed.

    python examples/arithmetic/generate.py            # writes train.jsonl and heldout.jsonl here

Each line: {"id", "messages": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": "42"}}.
Train and held-out problems come from disjoint seeds and never share a question text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Solve the problem. End your reply with the final answer on its own line as 'Answer: <number>'."

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kira",
    "Leo",
    "Maya",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
]
THINGS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "cookies",
    "stamps",
    "shells",
    "cards",
]


def _one_step(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(5, 60), rng.randint(5, 60)
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 2)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", a - b
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    return (
        f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} does {name} buy in total?",
        a * b,
    )


def _two_step(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(10, 50), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    return (
        f"{name} has {a} {thing}, finds {b} more, then gives {c} to a friend. "
        f"How many {thing} does {name} have now?",
        a + b - c,
    )


def make_problem(rng: random.Random) -> tuple[str, int]:
    return _two_step(rng) if rng.random() < 0.3 else _one_step(rng)


def generate(n: int, seed: int, prefix: str, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    items, seen = [], set(exclude)
    while len(items) < n:
        question, answer = make_problem(rng)
        if question in seen:
            continue
        seen.add(question)
        items.append(
            {
                "id": f"{prefix}-{len(items):05d}",
                "messages": [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}],
                "reward_model": {"ground_truth": str(answer)},
            }
        )
    return items


def write_jsonl(items: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    heldout = generate(args.heldout, seed=args.seed + 1, prefix="heldout")
    train = generate(
        args.train,
        seed=args.seed,
        prefix="train",
        exclude={i["messages"][0]["content"].split("\n")[0] for i in heldout},
    )
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(heldout, args.out / "heldout.jsonl")
    print(f"wrote {len(train)} train and {len(heldout)} held-out problems to {args.out}")


if __name__ == "__main__":
    main()
