"""The agentic showcases (examples/calculator_agent/, examples/sql_agent/; docs/agentic.md): the
data is reproducible and its splits disjoint, the tools are plain functions that answer every
input with a string, and the graders, run in the real sandbox, score final answers."""

from __future__ import annotations

import importlib.util
import inspect
import json
import random
import re
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from core.model_store import default_model_dir
from reward_workers.config import RewardConfig
from reward_workers.sandbox import GraderSandbox
from rollout_workers.config import RolloutConfig
from services.cli.main import load_grader_spec
from services.config import load_config
from services.orchestrator.data import load_items

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASKS = ["calculator_agent", "sql_agent"]
SPLITS = {
    "calculator_agent": ["train.jsonl", "heldout.jsonl", "heldout_paraphrased.jsonl"],
    "sql_agent": ["train.jsonl", "heldout.jsonl"],
}


def load_module(task: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{task}_{name}", EXAMPLES / task / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


calculator = load_module("calculator_agent", "tools")
sql_tools = load_module("sql_agent", "tools")


def items(task: str, split: str) -> list[dict]:
    return load_items(EXAMPLES / task / split)


def user_text(item: dict) -> str:
    return item["messages"][-1]["content"]


# -- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_generator_reproduces_the_committed_data(task, tmp_path):
    generate = load_module(task, "generate")
    if task == "calculator_agent":
        generate.write(tmp_path)
    else:
        sys.path.insert(0, str(EXAMPLES))
        from dataset_split import write_splits

        write_splits(generate.make_item, tmp_path, 1000, 300, generate.SEED)
    for name in SPLITS[task]:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / task / name).read_bytes(), name


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint(task):
    splits = {name: items(task, name) for name in SPLITS[task]}
    ids = [item["id"] for split in splits.values() for item in split]
    assert len(ids) == len(set(ids))
    train, heldout = splits["train.jsonl"], splits["heldout.jsonl"]
    assert len(heldout) >= 200 and len(train) >= 500
    assert not {user_text(i) for i in train} & {user_text(i) for i in heldout}
    assert len({user_text(i) for i in heldout}) == len(heldout)
    for item in train + heldout:
        assert item["messages"][0]["role"] == "system" and "<tool_call>" in item["messages"][0]["content"]


def test_calculator_data_is_what_the_tool_computes_and_paraphrases_are_new_wording():
    train, heldout, paraphrased = (items("calculator_agent", name) for name in SPLITS["calculator_agent"])
    for item in train + heldout + paraphrased:
        assert calculator.calculate(item["expression"]) == item["reward_model"]["ground_truth"]
    assert not {i["expression"] for i in train} & {i["expression"] for i in heldout}
    # The same problems as heldout.jsonl, worded as no training or held-out item is.
    assert [(i["expression"], i["reward_model"]) for i in paraphrased] == [
        (i["expression"], i["reward_model"]) for i in heldout
    ]
    seen = {user_text(i) for i in train + heldout}
    assert not any(user_text(i) in seen for i in paraphrased)
    # Not for one's head (or a 135M model's): operands of 2+ digits, and three of them or a 3-digit one.
    for item in train + heldout:
        numbers = [int(n) for n in re.findall(r"\d+", item["expression"])]
        assert min(numbers) >= 10 and (len(numbers) >= 3 or max(numbers) >= 100), item["expression"]


@pytest.mark.skipif(
    not (default_model_dir() / "tokenizer.json").is_file(), reason="needs the embedded model's tokenizer"
)
def test_prompts_fit_the_prompt_budget():
    from transformers import AutoTokenizer

    from services.orchestrator.data import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    for task in TASKS:
        budget = yaml.safe_load((EXAMPLES / f"{task}.yaml").read_text())["data"]["max_prompt_tokens"]
        for name in SPLITS[task]:
            for item in sorted(items(task, name), key=lambda i: len(user_text(i)))[-5:]:
                prompt_token_ids(item, tokenizer, budget)  # raises past the budget


# -- the calculator tool -------------------------------------------------------------------


def test_calculate_computes():
    cases = {
        "487 * 63": "30681",
        "4821 + 377 + 9012 + 655": "14865",
        "12 * (3 + 4) - 5": "79",
        "8742 / 47": "186",
        "1 / 4": "0.25",
        "7 // 2 + 7 % 2": "4",
        "-2 ** 10": "-1024",
        "2 ** -1": "0.5",
        # how models write it: ×, ÷, −, ^, thousands separators, a trailing =
        "487 × 63 =": "30681",
        "10 ÷ 4": "2.5",
        "2^5 − 1": "31",
        "1,234 + 10": "1244",
        " 42 ": "42",
    }
    assert {expression: calculator.calculate(expression) for expression in cases} == cases
    assert calculator.calculate(17) == "17"  # a number instead of a string


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("__import__('os').system('ls')", "function calls"),
        ("open('/etc/passwd').read()", "not allowed"),
        ("x + 1", "names"),
        ("(1).__class__", "attribute access"),
        ("[1, 2]", "not allowed"),
        ("'a' * 3", "not allowed"),
        ("True + 1", "not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("9 ** 9 ** 9", "exponents are limited"),
        ("2 ** 1000", "exponents are limited"),
        ("10 ** 99 * 10 ** 99", "too large"),
        ("99 ** 99", "too large"),
        ("1e308 * 10", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("", "not an arithmetic expression"),
        ("1; import os", "not an arithmetic expression"),
        ("1" * 201, "longer than"),
        (None, "must be a string"),
        ({"expression": "1 + 1"}, "must be a string"),
    ],
)
def test_calculate_refuses_with_an_error_string(expression, reason):
    result = calculator.calculate(expression)
    assert result.startswith("Error: ") and reason in result, result


def test_calculate_never_raises_on_noise():
    rng = random.Random(0)
    alphabet = "0123456789+-*/%().e ^×,_ajx'\"[]{}<>=!~&|@"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(calculator.calculate(text), str)


# -- the sql tools -------------------------------------------------------------------------


@pytest.fixture()
def sql_item() -> dict:
    heldout = items("sql_agent", "heldout.jsonl")
    return next(i for i in heldout if 1 < len(i["expected"]) <= sql_tools.MAX_ROWS)


def test_sql_tools_list_describe_and_answer(sql_item):
    state = sql_tools.setup(sql_item)
    tables = sorted(sql_item["database"]["rows"])
    assert sql_tools.list_tables(state) == ", ".join(tables)
    for table in tables:
        description = sql_tools.describe_table(table, state)
        assert description.startswith(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY")
        assert description.endswith(f"(rows: {len(sql_item['database']['rows'][table])})")
    assert sql_tools.describe_table("nope", state).startswith("Error: no table named 'nope'")
    result = sql_tools.run_query(sql_item["reward_model"]["ground_truth"], state).splitlines()
    expected = [" | ".join(map(str, row)) for row in sql_item["expected"]]
    assert sorted(result[1:-1]) == sorted(expected) and result[-1] == f"(rows: {len(expected)})"
    assert sql_tools.run_query("  -- a comment\nWITH t AS (SELECT 2 AS x) SELECT x * 3 FROM t", state) == (
        "x * 3\n6\n(rows: 1)"
    )


@pytest.mark.parametrize(
    "query, reason",
    [
        ("DELETE FROM {t}", "only SELECT"),
        ("UPDATE {t} SET id = 0", "only SELECT"),
        ("INSERT INTO {t} (id) VALUES (99)", "only SELECT"),
        ("DROP TABLE {t}", "only SELECT"),
        ("CREATE TABLE x (a)", "only SELECT"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "only SELECT"),
        ("PRAGMA table_info({t})", "only SELECT"),
        ("/* hidden */ PRAGMA query_only = OFF", "only SELECT"),
        ("WITH t AS (SELECT 1) DELETE FROM {t}", "not authorized"),
        ("SELECT * FROM pragma_table_info('{t}')", "not authorized"),
        ("SELECT 1; DROP TABLE {t}", "one statement"),
        ("SELECT * FROM no_such_table", "no such table"),
        ("SELECT FROM", "syntax error"),
        (3, "must be a string"),
    ],
)
def test_sql_tools_refuse_anything_but_reading(sql_item, query, reason):
    state = sql_tools.setup(sql_item)
    table = sorted(sql_item["database"]["rows"])[0]
    before = sql_tools.run_query(f"SELECT * FROM {table}", state)
    result = sql_tools.run_query(query.format(t=table) if isinstance(query, str) else query, state)
    assert result.startswith("Error: ") and reason in result, result
    assert sql_tools.run_query(f"SELECT * FROM {table}", state) == before
    with pytest.raises(sqlite3.DatabaseError):  # read-only below the tool's own check too
        state.execute(f"DELETE FROM {table}")


def test_run_query_bounds_rows_characters_and_time(sql_item, monkeypatch):
    state = sql_tools.setup(sql_item)
    table = sorted(sql_item["database"]["rows"])[0]
    many = sql_tools.run_query(f"SELECT * FROM {table} a, {table} b", state).splitlines()
    assert len(many) == 1 + sql_tools.MAX_ROWS + 1 and many[-1] == "(only the first 20 rows shown)"
    wide = sql_tools.run_query(f"SELECT hex(zeroblob(3000)) FROM {table}", state)
    assert len(wide) < sql_tools.MAX_CHARS + 100 and wide.endswith("characters)")
    assert "too big" in sql_tools.run_query("SELECT randomblob(10000000)", state)
    monkeypatch.setattr(sql_tools, "QUERY_SECONDS", 0.2)
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n"
    assert sql_tools.run_query(endless, state).startswith("Error: the query ran longer than")


@pytest.mark.parametrize("module", [calculator, sql_tools], ids=["calculator_agent", "sql_agent"])
def test_tools_follow_the_contract(module):
    """docs/agentic.md: TOOLS are plain functions with a docstring; every argument but `state`
    has a type hint (the JSON schema the model sees); each returns a string."""
    for tool in module.TOOLS:
        assert inspect.isfunction(tool) and tool.__doc__, tool
        for name, parameter in inspect.signature(tool).parameters.items():
            assert name == "state" or parameter.annotation == "str", (tool.__name__, name)
            assert name == "state" or f"{name}:" in tool.__doc__, (tool.__name__, name)
        assert inspect.signature(tool).return_annotation == "str"


def call_tool(module, reply: str, state=None) -> str:
    """What the `tools` environment does with a reply (docs/agentic.md), in a few lines."""
    call = json.loads(re.search(r"<tool_call>(.*?)</tool_call>", reply, re.DOTALL).group(1))
    tool = {tool.__name__: tool for tool in module.TOOLS}[call["name"]]
    extra = {"state": state} if "state" in inspect.signature(tool).parameters else {}
    return tool(**call["arguments"], **extra)


def test_the_call_each_prompt_shows_runs():
    item = items("calculator_agent", "heldout.jsonl")[0]
    assert call_tool(calculator, item["messages"][0]["content"]) == "84"  # 12 * (3 + 4)
    item = items("sql_agent", "heldout.jsonl")[0]
    state = sql_tools.setup(item)
    assert call_tool(sql_tools, item["messages"][0]["content"], state) == ", ".join(
        sorted(item["database"]["rows"])
    )
    reply = (
        '<tool_call>{"name": "run_query", "arguments": {"sql": "SELECT COUNT(*) AS n FROM %s"}}</tool_call>'
    )
    assert call_tool(sql_tools, reply % sorted(item["database"]["rows"])[0], state) == "n\n8\n(rows: 1)"


# -- configs and graders -------------------------------------------------------------------


def load_job(task: str, tmp_path: Path):
    """The job config through load_config. Until the environment runtime adds its rollout
    fields, those are checked here and left out of the validated copy."""
    path = EXAMPLES / f"{task}.yaml"
    raw = yaml.safe_load(path.read_text())
    environment = raw["rollout"]["environment"]
    assert environment["type"] == "tools" and (EXAMPLES / environment["path"]) == EXAMPLES / task / "tools.py"
    assert (EXAMPLES / environment["path"]).is_file()
    agentic = ("environment", "max_turns", "max_episode_tokens")
    if all(key in RolloutConfig.model_fields for key in agentic):
        return load_config(path), raw
    for key in agentic:
        raw["rollout"].pop(key)
    for key in ("train", "heldout"):
        raw["data"][key] = str(EXAMPLES / raw["data"][key])
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw))
    return load_config(copy), yaml.safe_load(path.read_text())


@pytest.mark.parametrize("task, max_turns", [("calculator_agent", 4), ("sql_agent", 6)])
def test_config_loads_with_the_task_grader_data_and_environment(task, max_turns, tmp_path):
    cfg, raw = load_job(task, tmp_path)
    assert raw["rollout"]["max_turns"] == max_turns
    assert Path(cfg.data.train) == EXAMPLES / task / "train.jsonl"
    assert Path(cfg.data.heldout) == EXAMPLES / task / "heldout.jsonl"
    # The job inlines its grader; the spec file `rft eval --grader` takes must say the same.
    assert cfg.reward.grader == load_grader_spec(str(EXAMPLES / task / "grader.yaml"))


def grade(task: str, cases: list[tuple[str, dict]]) -> list[float]:
    """Score (final assistant message, item) pairs with the task's grader.yaml in the sandbox."""
    spec = load_grader_spec(str(EXAMPLES / task / "grader.yaml"))
    cfg = RewardConfig(grader=spec, timeout_s=20.0, cpu_s=5, memory_mb=1024)
    with GraderSandbox(cfg.grader, cfg) as sandbox:
        results = sandbox.grade(
            [{"output_text": text, "finish_reason": "stop"} for text, _ in cases], [item for _, item in cases]
        )
    assert [r.error for r in results] == [None] * len(results)
    return [round(r.reward, 4) for r in results]


def test_calculator_grader_scores_the_final_answer():
    item = items("calculator_agent", "heldout.jsonl")[0]
    truth = int(item["reward_model"]["ground_truth"])
    assert grade(
        "calculator_agent",
        [
            (f"The calculator says {truth}.\nAnswer: {truth}", item),
            (f"Answer: {truth:,}", item),
            (f"**Answer: {truth}**", item),
            ("I am not sure, maybe a lot.", item),  # wrong, no number
            (f"It is {truth + 1}.", item),  # wrong, no format
            (f"Answer: {truth + 1}", item),  # wrong, in the asked-for format: the format credit only
            (f"Answer: {truth + 1}\n(the tool said {truth})", item),
            (f"The result is {truth}.", item),  # right, not in the format: the lenient credit only
        ],
    ) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.2, 0.5, 0.3]


def test_sql_grader_scores_the_final_query():
    heldout = items("sql_agent", "heldout.jsonl")
    ordered = next(i for i in heldout if i["order_matters"])
    counting = next(i for i in heldout if i["reward_model"]["ground_truth"].startswith("SELECT COUNT(*)"))
    fenced = lambda query: f"```sql\n{query}\n```"
    reference = lambda item: item["reward_model"]["ground_truth"]
    table = reference(counting).split(" FROM ")[1].split()[0].rstrip(";")
    assert grade(
        "sql_agent",
        [
            (fenced(reference(ordered)), ordered),
            (f"I checked the columns. Final query:\n{fenced(reference(counting))}", counting),
            ("I could not find the answer.", counting),
            (fenced(f"DELETE FROM {table};"), counting),
            (fenced(reference(ordered).replace("DESC", "ASC")), ordered),  # runs, wrong rows
            (fenced(f"SELECT COUNT(*) + 1 FROM {table};"), counting),
            (reference(counting), counting),  # right, not in a ```sql block
        ],
    ) == [1.0, 1.0, 0.0, 0.0, 0.2, 0.2, 0.8]
