"""Arithmetic word problems, generated deterministically from a seed.

    python examples/arithmetic/generate.py   # writes train, heldout and heldout_paraphrased.jsonl here

Each line: {"id", "messages": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": "42"}}.
Train and held-out problems come from disjoint seeds and never share a problem; training items
are worded with several templates and instructions (or none), held-out ones with the first, and
heldout_paraphrased.jsonl holds the held-out problems worded as training never is, without the
instruction.
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


# How a problem is worded. `train`: the first template of each kind words data.heldout; training
# items draw any of them, with one of TRAINING_INSTRUCTIONS (or none), so what training rewards is
# answering the question, not answering one sentence pattern. `paraphrased`: the held-out problems
# worded as training never is, with no instruction about the answer's format: a model that only
# learned the format (or the wording) gains nothing there.
WORDINGS = {
    "train": {
        "add": [
            "{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
            "{name} collected {a} {thing}, then collected {b} more. "
            "How many {thing} does {name} have altogether?",
            "A shelf holds {a} {thing}. {name} puts {b} more on it. How many {thing} are on the shelf?",
        ],
        "sub": [
            "{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?",
            "{name} had {a} {thing} and lost {b} of them. How many {thing} does {name} still have?",
            "A jar had {a} {thing}. {name} took {b} out of it. How many {thing} does the jar hold now?",
        ],
        "mul": [
            "{name} buys {a} bags with {b} {thing} in each bag. How many {thing} does {name} buy in total?",
            "{name} lays out {a} rows of {thing} with {b} in every row. How many {thing} are laid out?",
            "{name} makes {a} piles of {b} {thing}. How many {thing} does {name} make in all?",
        ],
        "two_step": [
            "{name} has {a} {thing}, finds {b} more, then gives {c} to a friend. "
            "How many {thing} does {name} have now?",
            "{name} had {a} {thing}, bought {b} more and then lost {c}. How many {thing} does {name} have?",
            "A bag has {a} {thing}. {name} adds {b} and takes out {c}. How many {thing} are in the bag?",
        ],
    },
    "paraphrased": {
        "add": [
            "There are {a} {thing} in {name}'s box. A neighbour adds {b}. What is the total number "
            "of {thing} in the box?"
        ],
        "sub": [
            "Out of {a} {thing}, {name} hands {b} to classmates. What number of {thing} remain with {name}?"
        ],
        "mul": [
            "Each of {a} boxes holds {b} {thing}. {name} takes all the boxes. Count the {thing} {name} takes."
        ],
        "two_step": [
            "{name} starts the day with {a} {thing}. At lunch {name} picks up another {b}, and "
            "in the evening {c} go to a friend. How many {thing} are left at the end of the day?"
        ],
    },
}
TRAINING_INSTRUCTIONS = [INSTRUCTION, "Give the final answer as 'Answer: <number>'.", None]


def _one_step(rng: random.Random) -> tuple[dict, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(5, 60), rng.randint(5, 60)
        return dict(kind=kind, name=name, thing=thing, a=a, b=b), a + b
    if kind == "sub":
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 2)
        return dict(kind=kind, name=name, thing=thing, a=a, b=b), a - b
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    return dict(kind=kind, name=name, thing=thing, a=a, b=b), a * b


def _two_step(rng: random.Random) -> tuple[dict, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(10, 50), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    return dict(kind="two_step", name=name, thing=thing, a=a, b=b, c=c), a + b - c


def make_problem(rng: random.Random) -> tuple[dict, int]:
    return _two_step(rng) if rng.random() < 0.3 else _one_step(rng)


def worded(problem: dict, wording: str, variant: int = 0) -> str:
    return WORDINGS[wording][problem["kind"]][variant].format(**problem)


def generate(n: int, seed: int, prefix: str, exclude: set[str] = frozenset()) -> list[tuple[dict, int]]:
    """n distinct problems (by their training wording), none in `exclude`."""
    rng = random.Random(seed)
    problems, seen = [], set(exclude)
    while len(problems) < n:
        problem, answer = make_problem(rng)
        question = worded(problem, "train")
        if question in seen:
            continue
        seen.add(question)
        problems.append((problem, answer))
    return problems


def train_and_heldout(n_train: int, n_heldout: int, seed: int) -> tuple[list, list]:
    """The training and held-out problems: disjoint seeds, and no held-out problem in training."""
    heldout = generate(n_heldout, seed=seed + 1, prefix="heldout")
    train = generate(n_train, seed=seed, prefix="train", exclude={worded(p, "train") for p, _ in heldout})
    return train, heldout


def as_items(
    problems: list[tuple[dict, int]],
    prefix: str,
    wording: str,
    instruction: str | None,
    mixed: random.Random | None = None,
) -> list[dict]:
    """One item per problem, worded with the first template and `instruction`; with `mixed`, each
    draws its template and instruction (TRAINING_INSTRUCTIONS) from that generator instead."""
    items = []
    for index, (problem, answer) in enumerate(problems):
        variant = mixed.randrange(len(WORDINGS[wording][problem["kind"]])) if mixed else 0
        said = mixed.choice(TRAINING_INSTRUCTIONS) if mixed else instruction
        content = worded(problem, wording, variant) + (f"\n{said}" if said else "")
        items.append(
            {
                "id": f"{prefix}-{index:05d}",
                "messages": [{"role": "user", "content": content}],
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
    train, heldout = train_and_heldout(args.train, args.heldout, args.seed)
    # Its own generator, so the wording drawn does not change which problems are drawn.
    mixed = random.Random(args.seed + 2)
    write_jsonl(as_items(train, "train", "train", INSTRUCTION, mixed), args.out / "train.jsonl")
    write_jsonl(as_items(heldout, "heldout", "train", INSTRUCTION), args.out / "heldout.jsonl")
    # The same held-out problems, worded differently and without the format instruction.
    write_jsonl(as_items(heldout, "paraphrased", "paraphrased", None), args.out / "heldout_paraphrased.jsonl")
    print(
        f"wrote {len(train)} train, {len(heldout)} held-out and {len(heldout)} paraphrased problems "
        f"to {args.out}"
    )


if __name__ == "__main__":
    main()
