"""Text-to-SQL questions answered by exploring a small SQLite database with tools (tools.py).

    python examples/sql_agent/generate.py          # writes train.jsonl and heldout.jsonl here

The tables, their random rows and the questions come from examples/text_to_sql/generate.py
(imported, not copied); here each item's database holds the question's table and one other, and
the prompt names neither the tables nor their columns: the model looks them up with
list_tables / describe_table, may try queries with run_query, and ends with one query. Each line:
- `messages`: [system (the tools, the call format, the final format), user ("Question: ...")];
- `database`: {"schema": "CREATE TABLE ...;\\nCREATE TABLE ...;", "rows": {table: [[...], ...]}}
  (what setup() builds for the tools and the sql grader builds to run the final query);
- `expected`: the reference query's result rows; `order_matters`: true for "highest first";
- `reward_model.ground_truth`: the reference query (for reading; the grader compares results).
Train and held-out questions come from different seeds and never share a prompt.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/
from dataset_split import generator_main  # noqa: E402
from text_to_sql.generate import TABLES, _question, run_query  # noqa: E402

SEED = 5151
SYSTEM = (
    "You answer a question about a SQLite database with one SELECT query. Your tools:\n"
    "- list_tables(): the tables\n"
    "- describe_table(table): a table's columns\n"
    "- run_query(sql): run a SELECT and see its first rows\n"
    "To use a tool, reply with only a tool call like\n"
    '<tool_call>{"name": "list_tables", "arguments": {}}</tool_call>\n'
    "and the result comes back in the next message. Look up the columns before you write the query.\n"
    "When you are done, reply without a tool call, with only the final query:\n"
    "```sql\nSELECT ...\n```"
)


def make_item(rng: random.Random) -> dict:
    table, other = rng.sample(TABLES, 2)
    rows = {t.name: [[i + 1, *row] for i, row in enumerate(t.make_rows(rng))] for t in (table, other)}
    question, reference, order_matters = _question(rng, table, rows[table.name])
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: {question}"},
        ],
        "database": {
            "schema": "\n".join(t.schema for t in sorted((table, other), key=lambda t: t.name)),
            "rows": {name: rows[name] for name in sorted(rows)},
        },
        "expected": run_query(table, rows[table.name], reference),
        "order_matters": order_matters,
        "reward_model": {"ground_truth": reference},
    }


def main() -> None:
    generator_main(make_item, __doc__.splitlines()[0], Path(__file__).parent, seed=SEED)


if __name__ == "__main__":
    main()
