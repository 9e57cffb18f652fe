"""Text-to-SQL questions over small SQLite tables, generated deterministically from a seed.

    python examples/text_to_sql/generate.py           # writes train.jsonl and heldout.jsonl here

Each item has one table (employees, products or books) with 8 random rows, a question about it,
and what the sql grader reads:
- `database`: {"schema": "CREATE TABLE ...", "rows": {table: [[...], ...]}} (built in memory per sample);
- `expected`: the result rows of the reference query on those rows (computed here with sqlite3);
- `order_matters`: true only for "highest first"-style questions;
- `reward_model.ground_truth`: the reference query itself (for reading; the grader compares results).
The prompt shows the table's columns, not its rows, so the query must be right for any data.
Train and held-out questions come from different seeds and never share a prompt.
"""

from __future__ import annotations

import random
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_split import generator_main  # noqa: E402  (examples/dataset_split.py)

REPLY_FORMAT = "Reply with only the query, like:\n```sql\nSELECT ...\n```"
ROWS_PER_TABLE = 8


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (column, SQLite type) after the id column
    entity: str  # "employees": how questions name the rows
    singular: str  # "employee"
    label: str  # the column questions ask for ("name", "title")
    groups: dict[str, str]  # text column -> where-phrase, e.g. "city": "in {v}"
    numbers: dict[str, str]  # numeric column -> how questions name it
    make_rows: Callable[[random.Random], list[list]]  # rows without the id column

    @property
    def schema(self) -> str:
        columns = ", ".join(f"{column} {kind}" for column, kind in self.columns)
        return f"CREATE TABLE {self.name} (id INTEGER PRIMARY KEY, {columns});"

    def column_names(self) -> list[str]:
        return ["id"] + [column for column, _ in self.columns]


def _employees(rng: random.Random) -> list[list]:
    names = rng.sample(
        [
            "Ana",
            "Ben",
            "Carla",
            "Dev",
            "Elif",
            "Femi",
            "Gus",
            "Hana",
            "Ivo",
            "Jin",
            "Kai",
            "Lena",
            "Mo",
            "Nia",
            "Oren",
            "Pia",
        ],
        ROWS_PER_TABLE,
    )
    salaries = rng.sample(range(30_000, 120_001, 500), ROWS_PER_TABLE)
    return [
        [
            name,
            rng.choice(["Sales", "Research", "Support", "Finance", "Legal"]),
            salary,
            rng.choice(["Paris", "Lagos", "Lima", "Osaka", "Boston", "Prague"]),
        ]
        for name, salary in zip(names, salaries)
    ]


def _products(rng: random.Random) -> list[list]:
    names = rng.sample(
        [
            "lamp",
            "desk",
            "chair",
            "kettle",
            "mug",
            "rug",
            "fan",
            "clock",
            "mirror",
            "vase",
            "shelf",
            "pillow",
            "blender",
            "toaster",
            "stool",
            "sofa",
        ],
        ROWS_PER_TABLE,
    )
    prices = rng.sample(range(5, 400), ROWS_PER_TABLE)
    stocks = rng.sample(range(0, 60), ROWS_PER_TABLE)
    return [
        [name, rng.choice(["kitchen", "office", "garden", "bedroom", "bath"]), price + 0.99, stock]
        for name, price, stock in zip(names, prices, stocks)
    ]


def _books(rng: random.Random) -> list[list]:
    titles = rng.sample(
        [
            "Dune",
            "Emma",
            "Ulysses",
            "Beloved",
            "Matilda",
            "Rebecca",
            "Persuasion",
            "Solaris",
            "Middlemarch",
            "Kindred",
            "Neuromancer",
            "Frankenstein",
            "Dracula",
            "Ivanhoe",
            "Walden",
            "Hyperion",
        ],
        ROWS_PER_TABLE,
    )
    years = rng.sample(range(1800, 2024), ROWS_PER_TABLE)
    pages = rng.sample(range(90, 1200), ROWS_PER_TABLE)
    return [
        [
            title,
            rng.choice(["Austen", "Butler", "Herbert", "Lem", "Morrison", "Shelley"]),
            rng.choice(["fantasy", "mystery", "classic", "horror", "scifi"]),
            year,
            page,
        ]
        for title, year, page in zip(titles, years, pages)
    ]


TABLES = [
    Table(
        "employees",
        (("name", "TEXT"), ("department", "TEXT"), ("salary", "INTEGER"), ("city", "TEXT")),
        "employees",
        "employee",
        "name",
        {"department": "in the {v} department", "city": "in {v}"},
        {"salary": "salary"},
        _employees,
    ),
    Table(
        "products",
        (("name", "TEXT"), ("category", "TEXT"), ("price", "REAL"), ("stock", "INTEGER")),
        "products",
        "product",
        "name",
        {"category": "in the {v} category"},
        {"price": "price", "stock": "stock"},
        _products,
    ),
    Table(
        "books",
        (("title", "TEXT"), ("author", "TEXT"), ("genre", "TEXT"), ("year", "INTEGER"), ("pages", "INTEGER")),
        "books",
        "book",
        "title",
        {"author": "by {v}", "genre": "in the {v} genre"},
        {"year": "publication year", "pages": "page count"},
        _books,
    ),
]
AGGREGATES = {"MAX": "highest", "MIN": "lowest", "AVG": "average", "SUM": "total"}


def _question(rng: random.Random, table: Table, rows: list[list]) -> tuple[str, str, bool]:
    """(question, reference query, order matters) about `rows` (with ids); values come from the
    rows, so filters match at least one row."""
    columns = table.column_names()
    row = rng.choice(rows)
    value_of = lambda column: row[columns.index(column)]
    group = rng.choice(sorted(table.groups))
    number = rng.choice(sorted(table.numbers))
    where_text, where_sql = table.groups[group].format(v=value_of(group)), f"{group} = '{value_of(group)}'"
    numbers = sorted(r[columns.index(number)] for r in rows)
    threshold = int(rng.choice(numbers[1:-1]))  # some rows on each side
    above = rng.random() < 0.5
    compare_text, compare_sql = (
        (f"above {threshold}", f"> {threshold}") if above else (f"below {threshold}", f"< {threshold}")
    )
    entity, label, t, number_text = table.entity, table.label, table.name, table.numbers[number]
    kind = rng.choice(
        [
            "list",
            "count",
            "aggregate",
            "aggregate_all",
            "threshold",
            "count_threshold",
            "argmax",
            "per_group",
            "top_k",
        ]
    )
    if kind == "list":
        return (
            f"List the {label}s of the {entity} {where_text}.",
            f"SELECT {label} FROM {t} WHERE {where_sql};",
            False,
        )
    if kind == "count":
        return f"How many {entity} are {where_text}?", f"SELECT COUNT(*) FROM {t} WHERE {where_sql};", False
    if kind in ("aggregate", "aggregate_all"):
        function = rng.choice(sorted(AGGREGATES))
        scope_text, scope_sql = (
            (f" of the {entity} {where_text}", f" WHERE {where_sql}")
            if kind == "aggregate"
            else (f" over all {entity}", "")
        )
        return (
            f"What is the {AGGREGATES[function]} {number_text}{scope_text}?",
            f"SELECT {function}({number}) FROM {t}{scope_sql};",
            False,
        )
    if kind == "threshold":
        return (
            f"List the {label}s of the {entity} with a {number_text} {compare_text}.",
            f"SELECT {label} FROM {t} WHERE {number} {compare_sql};",
            False,
        )
    if kind == "count_threshold":
        return (
            f"How many {entity} {where_text} have a {number_text} {compare_text}?",
            f"SELECT COUNT(*) FROM {t} WHERE {where_sql} AND {number} {compare_sql};",
            False,
        )
    if kind == "argmax":
        highest = rng.random() < 0.5
        return (
            f"Which {table.singular} has the {'highest' if highest else 'lowest'} {number_text}? "
            f"Give its {label}.",
            f"SELECT {label} FROM {t} ORDER BY {number} {'DESC' if highest else 'ASC'} LIMIT 1;",
            False,
        )
    if kind == "per_group":
        return (
            f"How many {entity} are there per {group}? Give each {group} and its count.",
            f"SELECT {group}, COUNT(*) FROM {t} GROUP BY {group};",
            False,
        )
    k = rng.randint(2, 4)
    return (
        f"List the {label}s of the {k} {entity} with the highest {number_text}, highest first.",
        f"SELECT {label} FROM {t} ORDER BY {number} DESC LIMIT {k};",
        True,
    )


def run_query(table: Table, rows: list[list], query: str) -> list[list]:
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(table.schema)
        connection.executemany(f"INSERT INTO {table.name} VALUES ({', '.join('?' * len(rows[0]))})", rows)
        return [list(result) for result in connection.execute(query).fetchall()]
    finally:
        connection.close()


def make_item(rng: random.Random) -> dict:
    table = rng.choice(TABLES)
    rows = [[i + 1, *row] for i, row in enumerate(table.make_rows(rng))]
    question, reference, order_matters = _question(rng, table, rows)
    prompt = (
        f"SQLite table: {table.name}({', '.join(table.column_names())})\n"
        f"Write a SELECT query for: {question}\n{REPLY_FORMAT}"
    )
    return {
        "messages": [{"role": "user", "content": prompt}],
        "database": {"schema": table.schema, "rows": {table.name: rows}},
        "expected": run_query(table, rows, reference),
        "order_matters": order_matters,
        "reward_model": {"ground_truth": reference},
    }


def main() -> None:
    generator_main(make_item, __doc__.splitlines()[0], Path(__file__).parent, seed=4242)


if __name__ == "__main__":
    main()
