"""sql: run the model's query on a real SQLite database built from the item and compare the
result set with the expected one (order-insensitive unless the spec or item asks for order).

The item gives the database as {"schema": "CREATE TABLE ...;", "rows": {table: [[...], ...]}}
(in memory, built per sample), and the expected result as a list of rows, or as a reference
query (a string) run on the same database. The model's query is the last ```sql block of the
reply, or the whole reply; it may only read (an authorizer refuses writes, ATTACH, PRAGMA).
It runs in the sandbox's grading child, under the sample's CPU, memory and wall-clock limits.
"""

from __future__ import annotations

import sqlite3
from collections import Counter

from reward_workers.graders.templates import GraderInputError, last_code_block, render, render_text

READ_ONLY_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


def _read_only(action, *_):
    return sqlite3.SQLITE_OK if action in READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY


def build_database(database) -> sqlite3.Connection:
    if not isinstance(database, dict) or not isinstance(database.get("schema"), str):
        raise GraderInputError(
            "sql: the item's database must be {'schema': 'CREATE TABLE ...', 'rows': {...}}"
        )
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(database["schema"])
        for table, rows in (database.get("rows") or {}).items():
            for row in rows:
                placeholders = ", ".join("?" * len(row))
                connection.execute(f'INSERT INTO "{table.replace(chr(34), "")}" VALUES ({placeholders})', row)
    except (sqlite3.Error, TypeError) as e:
        connection.close()
        raise GraderInputError(f"sql: the item's database cannot be built: {e}") from None
    connection.set_authorizer(_read_only)
    return connection


def _normalized(rows) -> list[tuple]:
    """Rows as tuples, numbers as rounded floats (so 2 == 2.0 and 0.1 + 0.2 == 0.3)."""

    def cell(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return round(float(value), 6)
        return value

    return [tuple(cell(v) for v in row) for row in rows]


def build(spec: dict):
    def grade(sample: dict, item: dict) -> dict:
        connection = build_database(render(spec["database"], sample, item))
        try:
            expected = render(spec["expected"], sample, item)
            if isinstance(expected, str):
                try:
                    expected = connection.execute(expected).fetchall()
                except sqlite3.Error as e:
                    raise GraderInputError(f"sql: the reference query fails: {e}") from None
            if not isinstance(expected, list) or not all(isinstance(row, (list, tuple)) for row in expected):
                raise GraderInputError("sql: the expected result must be a list of rows or a query")
            query = last_code_block(render_text(spec["query"], sample, item), ("sql", "sqlite")).strip()
            try:
                got = connection.execute(query).fetchall()
            except (sqlite3.Error, ValueError) as e:  # ValueError: e.g. a NUL character in the query
                return {"reward": 0.0, "components": {"executes": 0.0}, "diagnostics": [f"query failed: {e}"]}
        finally:
            connection.close()
        ordered = item.get("order_matters", spec["order_matters"])
        got, expected = _normalized(got), _normalized(expected)
        same = got == expected if ordered else Counter(got) == Counter(expected)
        diagnostics = [] if same else [f"expected {len(expected)} rows, got {len(got)}: {got[:3]!r:.300}"]
        return {"reward": float(same), "components": {"executes": 1.0}, "diagnostics": diagnostics}

    return grade
