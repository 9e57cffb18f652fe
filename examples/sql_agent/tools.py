"""The SQL agent showcase's tools (a `tools` environment, docs/agentic.md).

`setup(item)` builds the item's database ({"schema": "CREATE TABLE ...;", "rows": {table: [[...]]}},
the same field the sql grader reads) in memory and makes it read-only twice over:
`PRAGMA query_only` and an authorizer that allows only reading (no writes, ATTACH, PRAGMA).
The connection is the episode's state; each tool receives it as `state`. Standard library only.
"""

from __future__ import annotations

import re
import sqlite3
import time

MAX_ROWS = 20  # rows run_query shows
MAX_CHARS = 2000  # characters any tool returns
MAX_VALUE_BYTES = 100_000  # the longest string or blob a query may make
QUERY_SECONDS = 1.0  # a query running longer is interrupted

READ_ONLY_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}
EXPLAINED = {
    "not authorized": "not authorized (the database is read-only; PRAGMA and ATTACH are not allowed)",
    "interrupted": f"the query ran longer than {QUERY_SECONDS:g} s",
}
FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w*)", re.DOTALL)  # after comments


def setup(item: dict) -> sqlite3.Connection:
    database = item["database"]
    connection = sqlite3.connect(":memory:")
    connection.executescript(database["schema"])
    for table, rows in database.get("rows", {}).items():
        for row in rows:
            connection.execute(f'INSERT INTO "{table}" VALUES ({", ".join("?" * len(row))})', row)
    connection.commit()
    connection.execute("PRAGMA query_only = ON")
    if hasattr(connection, "setlimit"):  # Python 3.11+
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    connection.set_authorizer(
        lambda action, *_: sqlite3.SQLITE_OK if action in READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY
    )
    return connection


def list_tables(state: sqlite3.Connection) -> str:
    """List the tables of the database."""
    names = _tables(state)
    return ", ".join(names) if names else "(no tables)"


def describe_table(table: str, state: sqlite3.Connection) -> str:
    """Show a table's columns (with their types) and how many rows it has.

    Args:
        table: the table's name, as list_tables gives it
    """
    if table not in _tables(state):
        return f"Error: no table named {str(table)[:80]!r}; the tables are: {list_tables(state)}"
    (create,) = state.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    (count,) = state.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
    return _cut(f"{create}\n(rows: {count})")


def run_query(sql: str, state: sqlite3.Connection) -> str:
    """Run one read-only SQLite query (SELECT, or WITH ... SELECT) and show its first rows.

    Args:
        sql: the query, e.g. "SELECT name FROM employees WHERE city = 'Lima'"
    """
    if not isinstance(sql, str):
        return "Error: the query must be a string"
    if FIRST_WORD.match(sql).group(1).upper() not in ("SELECT", "WITH"):
        return "Error: only SELECT queries (or WITH ... SELECT) can run here"
    deadline = time.monotonic() + QUERY_SECONDS
    state.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        cursor = state.execute(sql)
        rows = cursor.fetchmany(MAX_ROWS + 1)
        columns = [column[0] for column in cursor.description or ()]
    except (sqlite3.Error, sqlite3.Warning, ValueError, MemoryError) as e:
        reason = EXPLAINED.get(str(e), str(e))
        return f"Error: {reason}"[:MAX_CHARS]
    finally:
        state.set_progress_handler(None, 0)
    lines = [" | ".join(columns)] + [" | ".join(_cell(value) for value in row) for row in rows[:MAX_ROWS]]
    footer = f"(only the first {MAX_ROWS} rows shown)" if len(rows) > MAX_ROWS else f"(rows: {len(rows)})"
    return _cut("\n".join(lines + [footer]))


def _tables(state: sqlite3.Connection) -> list[str]:
    query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    return [name for (name,) in state.execute(query).fetchall()]


def _cell(value) -> str:
    return "NULL" if value is None else str(value[:MAX_CHARS] if isinstance(value, (str, bytes)) else value)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f"\n... (cut at {MAX_CHARS} characters)"


TOOLS = [list_tables, describe_table, run_query]
# Paid once an episode, the first time the calls of a turn all run (see calculator_agent/tools.py).
TOOL_CALL_REWARD = 0.1
