"""The grader library, every type graded in the real sandbox (real sqlite, real interpreters).

One sandbox per spec; each grades several samples: starting a runner is the slow part.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from core.config import ConfigError
from reward_workers.config import RewardConfig
from reward_workers.graders import formula
from reward_workers.interface import ScoredRollout
from reward_workers.pool import hack_rates
from reward_workers.sandbox import GraderSandbox
from rollout_workers.interface import Rollout
from services.config import load_config

LIMITS = dict(timeout_s=20.0, cpu_s=5, memory_mb=1024)


def reward_config(spec: dict) -> RewardConfig:
    return RewardConfig(grader=spec, **LIMITS)


def grade_all(spec: dict, cases: list[tuple[str, dict]]):
    """Grade (output_text, item) pairs with `spec` in one sandbox."""
    cfg = reward_config(spec)
    with GraderSandbox(cfg.grader, cfg) as sandbox:
        return sandbox.grade(
            [{"output_text": text, "finish_reason": "stop"} for text, _ in cases], [item for _, item in cases]
        )


def rewards(spec: dict, cases: list[tuple[str, dict]]) -> list[float]:
    results = grade_all(spec, cases)
    assert all(r.error is None for r in results), [r.error for r in results]
    return [round(r.reward, 4) for r in results]


def truth(value) -> dict:
    return {"id": "q", "reward_model": {"ground_truth": value}}


# -- string_check, regex, numeric -----------------------------------------------------------


def test_string_check_operations():
    item = {"id": "q", "answer": "Paris"}
    for operation, expected in [
        ("eq", [1, 0, 0]),
        ("ne", [0, 1, 1]),
        ("like", [1, 0, 1]),
        ("ilike", [1, 1, 1]),
    ]:
        spec = {
            "type": "string_check",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": operation,
        }
        assert rewards(spec, [("Paris", item), ("paris", item), ("It is Paris.", item)]) == expected, (
            operation
        )


def test_templates_reach_into_json_output():
    spec = {
        "type": "string_check",
        "input": "{{sample.output_json.answer.0}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    assert rewards(
        spec,
        [
            ('{"answer": ["Paris", "Lyon"]}', {"answer": "Paris"}),
            ('{"answer": ["Lyon"]}', {"answer": "Paris"}),
        ],
    ) == [1, 0]
    (result,) = grade_all(spec, [("Paris", {"answer": "Paris"})])
    assert "{{sample.output_json.answer.0}}: the output is not JSON" in result.error


def test_template_naming_a_missing_field_is_a_grader_error():
    spec = {"type": "string_check", "reference": "{{item.reward_model.answer}}", "operation": "eq"}
    (result,) = grade_all(spec, [("x", truth("x"))])
    assert result.reward == 0.0 and "item.reward_model has no field 'answer'" in result.error


def test_regex_search_fullmatch_and_extract():
    assert rewards(
        {"type": "regex", "pattern": r"Answer:\s*\d+"}, [("so Answer: 12", {}), ("no answer", {})]
    ) == [1, 0]
    assert rewards(
        {"type": "regex", "pattern": r"[A-D]", "mode": "fullmatch"}, [(" B ", {}), ("B because", {})]
    ) == [1, 0]
    spec = {"type": "regex", "pattern": r"answer is (?P<answer>\w+)", "mode": "extract", "ignore_case": True}
    assert rewards(
        spec,
        [
            ("The answer is cat, final answer is Dog", truth("dog")),
            ("The answer is cat", truth("dog")),
            ("nothing", truth("dog")),
        ],
    ) == [1, 0, 0]


def test_numeric_strips_units_and_separators_within_tolerance():
    spec = {"type": "numeric"}
    assert rewards(
        spec,
        [
            ("It costs $1,234.50 in total", truth("1234.5")),
            ("12 km", truth("12")),
            ("45% of 200 is 90", truth("90")),
            ("1,234", truth("1234")),
            ("about 3", truth("4")),
            ("no idea", truth("4")),
            ("-7", truth("−7")),
        ],
    ) == [1, 1, 1, 1, 0, 0, 1]
    tolerant = {"type": "numeric", "abs_tol": 0.0, "rel_tol": 0.01}
    assert rewards(tolerant, [("99.5", truth("100")), ("98", truth("100"))]) == [1, 0]
    first = {"type": "numeric", "extract": "pattern", "pattern": r"Answer:\s*(\S+)"}
    assert rewards(
        first, [("3 apples, Answer: 3/4", truth("0.75")), ("Answer: none, 0.75", truth("0.75"))]
    ) == [1, 0]


def test_numeric_reference_that_is_not_a_number_is_an_error():
    (result,) = grade_all({"type": "numeric"}, [("3", truth("three"))])
    assert "reference 'three' is not a number" in result.error


# -- json_match -----------------------------------------------------------------------------

WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def test_json_match_tool_call_partial_credit_per_argument():
    item = truth(WEATHER_CALL)
    openai_form = json.dumps(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": json.dumps({"city": "Paris", "unit": "celsius"}),
            },
        }
    )
    assert rewards(
        {"type": "json_match"},
        [
            (json.dumps(WEATHER_CALL), item),
            (
                '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "f"}}</tool_call>',
                item,
            ),
            ('Calling: {"name": "get_weather", "arguments": {"city": "Rome"}} now', item),
            ('{"name": "get_time", "arguments": {"city": "Paris", "unit": "celsius"}}', item),
            (openai_form, item),
            ("I think it is sunny", item),
        ],
    ) == [1, 0.75, 0.5, 0, 1, 0]
    heavy_name = {"type": "json_match", "name_weight": 0.8}
    assert rewards(heavy_name, [('{"name": "get_weather", "arguments": {"city": "Paris"}}', item)]) == [0.9]


def test_json_match_multiple_calls_and_plain_json():
    two_calls = truth([WEATHER_CALL, {"name": "get_time", "arguments": {"tz": "CET"}}])
    assert rewards(
        {"type": "json_match"},
        [
            (
                json.dumps({"tool_calls": [WEATHER_CALL, {"name": "get_time", "arguments": {"tz": "CET"}}]}),
                two_calls,
            ),
            (json.dumps(WEATHER_CALL), two_calls),  # the second call is missing
        ],
    ) == [1, 0.5]
    record = truth({"name": "Ada", "born": 1815, "tags": ["math", "poetry"]})
    assert rewards(
        {"type": "json_match"},
        [
            ('```json\n{"name": "Ada", "born": 1815.0, "tags": ["math", "poetry"]}\n```', record),
            ('{"name": "Ada", "born": 1816, "tags": ["math"]}', record),
            ("not json", record),
        ],
    ) == [1, round((1 + 0 + 0.5) / 3, 4), 0]


def test_json_match_clarifying_question_or_refusal_instead_of_a_call():
    clarify, refuse = truth({"clarifying_question": True}), truth('{"refusal": true}')
    assert rewards(
        {"type": "json_match"},
        [
            ("Which city do you mean?", clarify),
            (json.dumps(WEATHER_CALL), clarify),
            ("Paris, probably.", clarify),
            ("I can't help with that.", refuse),
            (json.dumps(WEATHER_CALL), refuse),
        ],
    ) == [1, 0, 0, 1, 0]


# -- text_similarity ------------------------------------------------------------------------


def test_text_similarity_metrics():
    item = {"id": "q", "reference": "the cat sat"}

    def spec(metric, **extra):
        return {
            "type": "text_similarity",
            "reference": "{{item.reference}}",
            "evaluation_metric": metric,
            **extra,
        }

    assert rewards(spec("fuzzy_match"), [("the cat sat", item), ("the cat sit", item)]) == [
        1,
        round(1 - 2 / 22, 4),
    ]
    assert rewards(spec("rouge_1"), [("the cat ran", item), ("a dog", item)]) == [round(2 / 3, 4), 0]
    assert rewards(spec("rouge_l"), [("sat the cat", item)]) == [round(2 / 3, 4)]
    long_item = {"id": "q", "reference": "the quick brown fox jumps over the lazy dog"}
    bleu = rewards(spec("bleu"), [(long_item["reference"], long_item), ("the quick brown fox", long_item)])
    assert bleu[0] == 1.0 and 0 < bleu[1] < 0.5
    (result,) = grade_all(spec("fuzzy_match", pass_threshold=0.9), [("the cat sit", item)])
    assert result.components == {"fuzzy_match": pytest.approx(1 - 2 / 22), "passed": 1.0}


# -- python ---------------------------------------------------------------------------------


def test_python_grader_inline_source_and_file(tmp_path):
    code = (
        "def grade(sample, item):\n"
        "    return float(sample['output_text'] == item['reward_model']['ground_truth'])\n"
    )
    assert rewards(
        {"type": "python", "name": "exact", "source": code}, [("7", truth("7")), ("8", truth("7"))]
    ) == [1, 0]
    (tmp_path / "g.py").write_text(code)
    assert rewards({"source": str(tmp_path / "g.py")}, [("7", truth("7"))]) == [1]
    (result,) = grade_all(
        {"type": "python", "name": "broken", "source": "def grade(:\n"}, [("7", truth("7"))]
    )
    assert "grader <broken> failed to load: SyntaxError" in result.error


# -- code_tests -----------------------------------------------------------------------------

ADD_TESTS = {
    "id": "add",
    "tests": [
        "assert add(1, 2) == 3",
        {"name": "negative", "code": "assert add(-1, -1) == -2"},
        {"name": "floats", "code": "assert add(0.5, 0.25) == 0.75"},
    ],
}


def solution(code: str) -> str:
    return "Here you go:\n```python\n" + textwrap.dedent(code) + "```\n"


def test_code_tests_score_is_the_pass_rate_with_failures_kept():
    right = solution("def add(a, b):\n    return a + b\n")
    ints_only = solution("def add(a, b):\n    return int(a) + int(b)\n")
    results = grade_all(
        {"type": "code_tests"},
        [(right, ADD_TESTS), (ints_only, ADD_TESTS), ("def add(a, b) return", ADD_TESTS)],
    )
    assert [(r.reward, r.hack_flags, r.error) for r in results] == [
        (1.0, [], None),
        (2 / 3, [], None),
        (0.0, [], None),
    ]
    (failing,) = results[1].diagnostics
    assert (
        failing.startswith("floats failed:")
        and 'File "<floats>", line 1' in failing
        and "AssertionError" in failing
    )
    assert all("SyntaxError" in d for d in results[2].diagnostics) and len(results[2].diagnostics) == 3


def test_code_tests_program_io_and_time_limit():
    item = {
        "id": "sum",
        "tests": [
            {"name": "small", "stdin": "1 2\n", "stdout": "3\n"},
            {"name": "big", "stdin": "10 20", "stdout": "30"},
        ],
    }
    program = solution("a, b = map(int, input().split())\nprint(a + b)  \n")
    wrong = solution("print(3)\n")
    assert rewards({"type": "code_tests"}, [(program, item), (wrong, item)]) == [1, 0.5]
    item = {"id": "slow", "tests": ["assert f(1) == 1", "assert f(2) == 2"]}
    slow = solution("import time\ndef f(x):\n    while x == 2:\n        pass\n    return x\n")
    (result,) = grade_all({"type": "code_tests", "timeout_s": 2}, [(slow, item)])
    assert (result.reward, result.hack_flags) == (0.5, [])
    assert (
        "tests stopped: timed out" in result.diagnostics
        and "test_1 failed: did not run" in result.diagnostics
    )


HACKS = {  # solution -> the flag it must raise
    "import sys\nsys.exit(0)\n": "exit_before_tests",
    "import os\ndef add(a, b):\n    os._exit(0)\n": "exit_before_tests",
    "def add(a, b):\n    raise SystemExit\n": "exit_before_tests",
    # read the expected values from the test's frame
    "import sys\ndef add(a, b):\n    sys._getframe(1)\n    return a + b\n": "reads_tests",
    "import gc\ndef add(a, b):\n    gc.get_objects()\n    return a + b\n": "reads_tests",
    "def add(a, b):\n    try:\n        raise ValueError\n    except ValueError as e:\n"
    "        e.__traceback__.tb_frame\n    return a + b\n": "reads_tests",
    "def add(a, b):\n    open('/proc/self/mem', 'rb')\n    return a + b\n": "reads_tests",
    # change what the tests run with
    "import builtins\nbuiltins.AssertionError = Exception\ndef add(a, b):\n    return a + b\n": "edits_tests",
    "import __main__\n__main__.main = None\ndef add(a, b):\n    return a + b\n": "edits_tests",
    (
        "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\ndef add(a, b):\n    return a + b\n"
    ): "edits_tests",
    # write a report line of its own
    "import os\nfor fd in range(3, 8):\n    try:\n        os.write(fd, b'{\"done\": true}\\n')\n"
    "    except OSError:\n        pass\ndef add(a, b):\n    return a + b\n": "forged_report",
}


def test_code_tests_anti_hacking_probes_score_zero_with_a_flag():
    honest = solution(
        "import enum, logging, sys, typing\nfrom collections import namedtuple\n"
        "Pair = namedtuple('Pair', 'a b')\nT = typing.TypeVar('T')\nColour = enum.Enum('Colour', 'red')\n"
        "def add(a, b):\n    print('adding', a, b, file=sys.stderr)\n    print(a + b)\n"
        "    logging.warning('adding')\n    return sum(Pair(a, b))\n"
    )
    cases = [(honest, ADD_TESTS)] + [(solution(code), ADD_TESTS) for code in HACKS]
    results = grade_all({"type": "code_tests"}, cases)
    assert (results[0].reward, results[0].hack_flags) == (1.0, [])
    for code, flag, result in zip(HACKS, HACKS.values(), results[1:]):
        assert result.reward == 0.0 and flag in result.hack_flags and result.error is None, (code, result)


def test_code_tests_bad_item_is_an_error():
    (result,) = grade_all({"type": "code_tests"}, [("x = 1", {"id": "q", "tests": []})])
    assert "tests must be a non-empty list" in result.error


# -- sql ------------------------------------------------------------------------------------

DATABASE = {
    "schema": "CREATE TABLE people (name TEXT, age INTEGER, city TEXT);",
    "rows": {"people": [["Ann", 31, "Oslo"], ["Bob", 25, "Rome"], ["Cid", 40, "Oslo"]]},
}


def sql_item(**extra) -> dict:
    return {"id": "q", "database": DATABASE, "expected": [["Ann"], ["Cid"]], **extra}


def test_sql_result_sets_compared_order_insensitively():
    results = grade_all(
        {"type": "sql"},
        [
            ("```sql\nSELECT name FROM people WHERE city = 'Oslo' ORDER BY age DESC\n```", sql_item()),
            (
                "SELECT name FROM people WHERE age > 30",
                sql_item(expected="SELECT name FROM people WHERE city='Oslo'"),
            ),
            ("SELECT name FROM people", sql_item()),
            ("SELECT nme FROM people", sql_item()),
            ("SELECT name FROM people WHERE city = 'Oslo' ORDER BY age DESC", sql_item(order_matters=True)),
            ("SELECT COUNT(*) * 1.0 FROM people", sql_item(expected=[[3]])),
        ],
    )
    assert [(r.reward, r.components.get("executes"), r.error) for r in results] == [
        (1.0, 1.0, None),
        (1.0, 1.0, None),
        (0.0, 1.0, None),
        (0.0, 0.0, None),
        (0.0, 1.0, None),
        (1.0, 1.0, None),
    ]
    assert "expected 2 rows, got 3" in results[2].diagnostics[0]
    assert "no such column: nme" in results[3].diagnostics[0]
    ordered = {"type": "sql", "order_matters": True}
    assert rewards(ordered, [("SELECT name FROM people WHERE city = 'Oslo' ORDER BY age", sql_item())]) == [1]


def test_sql_queries_may_only_read():
    writes = [
        "DELETE FROM people",
        "DROP TABLE people",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "PRAGMA writable_schema = 1",
        "SELECT 1; DELETE FROM people",
    ]
    results = grade_all({"type": "sql"}, [(query, sql_item()) for query in writes])
    for query, result in zip(writes, results):
        assert result.reward == 0.0 and result.error is None and result.components == {"executes": 0.0}, query


def test_sql_bad_database_is_an_error():
    item = {"id": "q", "database": {"schema": "CREATE TABLE t (a INT"}, "expected": []}
    (result,) = grade_all({"type": "sql"}, [("SELECT 1", item)])
    assert "the item's database cannot be built" in result.error


# -- multi ----------------------------------------------------------------------------------


def test_multi_by_weights_and_by_formula():
    subs = {
        "exact": {
            "type": "string_check",
            "reference": "{{item.reward_model.ground_truth}}",
            "operation": "eq",
        },
        "close": {"type": "numeric", "abs_tol": 1},
    }
    weighted = {"type": "multi", "graders": subs, "weights": {"exact": 3, "close": 1}}
    assert rewards(weighted, [("42", truth("42")), ("43", truth("42")), ("50", truth("42"))]) == [1, 0.25, 0]
    formula_spec = {"type": "multi", "graders": subs, "calculate_output": "max(exact, 0.5 * close ^ 2) + 0.1"}
    results = grade_all(formula_spec, [("43", truth("42"))])
    assert results[0].reward == pytest.approx(0.6)
    assert results[0].components == {"exact": 0.0, "close": 1.0, "close.found": 1.0}


def test_multi_hack_in_a_sub_grader_zeroes_the_total():
    spec = {
        "type": "multi",
        "graders": {"format": {"type": "regex", "pattern": "```python"}, "tests": {"type": "code_tests"}},
        "weights": {"format": 1, "tests": 1},
    }
    honest = solution("def add(a, b):\n    return a + b\n")
    hack = solution("import sys\nsys.exit(0)\n")
    results = grade_all(spec, [(honest, ADD_TESTS), (hack, ADD_TESTS)])
    assert [(r.reward, r.hack_flags) for r in results] == [(1.0, []), (0.0, ["tests:exit_before_tests"])]
    assert results[1].components["format"] == 1.0
    scored = [
        ScoredRollout(
            Rollout("q", i, [], [], [], 0, "stop", ""), r.reward, r.components, r.error, r.hack_flags
        )
        for i, r in enumerate(results)
    ]
    assert hack_rates(reward_config(spec).grader, scored) == {"grader": 0.5, "format": 0.0, "tests": 0.5}


# -- the OpenAI RFT grader JSON, unchanged --------------------------------------------------

OPENAI_MULTI = {
    "type": "multi",
    "name": "answer quality",
    "graders": {
        "exact": {
            "type": "string_check",
            "name": "Exact answer",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.reference_answer }}",
            "operation": "eq",
        },
        "similar": {
            "type": "text_similarity",
            "name": "Similarity",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference_answer}}",
            "evaluation_metric": "fuzzy_match",
            "pass_threshold": 0.8,
        },
        "length": {
            "type": "python",
            "name": "Short",
            "image_tag": "2025-05-08",
            "source": "def grade(sample, item) -> float:\n"
            "    return 1.0 if len(sample['output_text']) <= 20 else 0.0\n",
        },
    },
    "calculate_output": "0.5 * exact + 0.3 * similar + 0.2 * length",
}


def test_openai_grader_json_runs_unchanged():
    item = {"id": "q", "reference_answer": "Mount Everest"}
    results = grade_all(
        OPENAI_MULTI,
        [
            ("Mount Everest", item),
            ("Mount Everestt", item),
            ("It is Mount Everest, the highest mountain on Earth", item),
        ],
    )
    assert [r.error for r in results] == [None] * 3
    assert results[0].reward == pytest.approx(1.0)
    assert results[1].reward == pytest.approx(0.3 * (1 - 1 / 27) + 0.2)
    assert results[1].components["similar.passed"] == 1.0 and results[2].components["length"] == 0.0


# -- the spec as config ---------------------------------------------------------------------


def test_config_errors_name_the_bad_field(tmp_path):
    def load(grader_yaml: str):
        (tmp_path / "train.jsonl").write_text('{"id": "a", "prompt": "p"}\n')
        (tmp_path / "job.yaml").write_text(f"data: {{train: train.jsonl}}\nreward:\n  grader:\n{grader_yaml}")
        return load_config(tmp_path / "job.yaml")

    with pytest.raises(ConfigError, match=r"reward.grader.string_check.operation: Input should be 'eq'"):
        load("    type: string_check\n    reference: x\n    operation: equals\n")
    with pytest.raises(ConfigError, match=r"reward.grader.numeric.tolerance: unknown field"):
        load("    type: numeric\n    tolerance: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"reward.grader: Input tag 'fuzzy' found using 'type' does not match"
    ):
        load("    type: fuzzy\n")
    with pytest.raises(
        ConfigError,
        match=r"reward: .*code_tests graders' timeout_s \(12 s in all\) must be below "
        r"reward.timeout_s \(10 s\)",
    ):
        load("    type: multi\n    graders: {a: {type: code_tests}, b: {type: code_tests, timeout_s: 7}}\n")
    with pytest.raises(ConfigError, match=r"reward.grader.multi: .*unknown name 'c'"):
        load("    type: multi\n    graders: {a: {type: regex, pattern: x}}\n    calculate_output: a + c\n")
    (tmp_path / "sub.py").write_text("def grade(sample, item):\n    return 1.0\n")
    cfg = load(
        "    type: multi\n    graders:\n      a: {source: sub.py}\n      b: {type: regex, pattern: x}\n"
    )
    assert cfg.reward.grader.graders["a"].source == str(tmp_path / "sub.py")  # relative to the config


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('x')",
        "a.__class__",
        "(lambda: 1)()",
        "a if a else 1",
        "[a]",
        "'a'",
        "a < 1",
        "max(a, key=abs)",
        "open",
    ],
)
def test_formula_rejects_anything_but_arithmetic(expression):
    with pytest.raises(formula.FormulaError):
        formula.parse(expression, {"a"})


def test_formula_arithmetic():
    tree = formula.parse("2 ^ 3 + -a * 2 % 3 + sqrt(4) + floor(1.7) - abs(-1) / ceil(0.2)", {"a"})
    assert formula.evaluate(tree, {"a": 1.0}) == 8 + (-2 % 3) + 2 + 1 - 1
    with pytest.raises(formula.FormulaError, match="exponent too large"):
        formula.evaluate(formula.parse("9 ^ 9 ^ 9", set()), {})


def test_hack_rate_reaches_the_metrics(tmp_path):
    from services.orchestrator.metrics import RunMetrics

    metrics = RunMetrics("job", tmp_path / "run", port=0)
    try:
        metrics.record(1, {"reward_mean": 0.5}, hack_rates={"answer": 0.25, "tests": 0.5})
        for grader, rate in (("answer", 0.25), ("tests", 0.5)):
            assert (
                metrics.registry.get_sample_value("rft_grader_hack_rate", {"job": "job", "grader": grader})
                == rate
            )
    finally:
        metrics.close()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["grader_hack_rate"] == {"answer": 0.25, "tests": 0.5}
