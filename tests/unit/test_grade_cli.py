"""`rft grade`: samples scored offline in the real sandbox, per-sample lines and a summary."""

from __future__ import annotations

import json
import subprocess
import sys

ITEMS = [
    {
        "id": "sum",
        "prompt": "Write add(a, b).",
        "reward_model": {"ground_truth": "3"},
        "tests": ["assert add(1, 2) == 3", {"name": "negative", "code": "assert add(-1, -1) == -2"}],
    },
    {
        "id": "capital",
        "prompt": "Capital of France?",
        "reward_model": {"ground_truth": "Paris"},
        "tests": ["pass"],
    },
]
SPEC = """\
type: multi
name: answer
graders:
  tests: {type: code_tests}
  exact: {type: string_check, reference: "{{item.reward_model.ground_truth}}", operation: ilike}
weights: {tests: 3, exact: 1}
"""


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def rft_grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "grade", *args], capture_output=True, text=True, timeout=300
    )


def summary_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1 : stdout.rindex("}") + 1])


def test_grade_prints_scores_hacks_and_a_summary(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    samples = [
        {"id": "sum", "output_text": "```python\ndef add(a, b):\n    return a + b\n```"},
        {"prompt_id": "sum", "output_text": "def add(a, b):\n    return abs(a + b)\n"},
        {"id": "sum", "output_text": "import os\nos._exit(0)\n"},
        {"id": "capital", "output_text": "It is paris."},
    ]
    result = rft_grade(
        "--grader",
        str(tmp_path / "spec.yaml"),
        "--data",
        write_jsonl(tmp_path / "items.jsonl", ITEMS),
        "--samples",
        write_jsonl(tmp_path / "samples.jsonl", samples),
        "--output",
        str(tmp_path / "results.jsonl"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sum#0  reward 0.750  tests 1.000")  # 3/4 tests + 0 of the exact match
    assert lines[1].startswith("sum#1  reward 0.375  tests 0.500") and "negative failed:" in lines[2]
    assert "HACK tests:exit_before_tests" in result.stdout
    summary = summary_of(result.stdout)
    assert summary["count"] == 4 and summary["grader_error_rate"] == 0.0
    assert summary["hack_rate_by_grader"] == {"answer": 0.25, "tests": 0.25, "exact": 0.0}
    assert summary["reward_mean_by_grader"]["tests"] == (1 + 0.5 + 0 + 0) / 4  # prose is not Python
    assert result.stdout.rstrip().splitlines()[-1].endswith("errors 0.000  hacks 0.250  (n=4)")
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records[2]["hack_flags"] == ["tests:exit_before_tests"] and records[3]["reward"] == 0.25


def test_grade_reads_a_runs_samples_and_an_openai_grader_json(tmp_path):
    openai_grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.reward_model.ground_truth }}",
        "operation": "eq",
    }
    (tmp_path / "grader.json").write_text(json.dumps(openai_grader))
    run_samples = [  # the driver's samples.jsonl lines
        {
            "step": 1,
            "sample_id": "capital#0",
            "policy_version": 0,
            "text": "Paris",
            "reward": 1.0,
            "trained": True,
        },
        {
            "step": 1,
            "sample_id": "capital#1",
            "policy_version": 0,
            "text": "Lyon",
            "reward": 0.0,
            "trained": True,
        },
    ]
    result = rft_grade(
        "--grader",
        str(tmp_path / "grader.json"),
        "--data",
        write_jsonl(tmp_path / "i.jsonl", ITEMS),
        "--samples",
        write_jsonl(tmp_path / "samples.jsonl", run_samples),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("capital#0  reward 1.000\ncapital#1  reward 0.000\n")
    assert summary_of(result.stdout)["reward_mean_by_grader"] == {"exact": 0.5}


def test_grade_errors_name_the_culprit(tmp_path):
    items = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    (tmp_path / "bad.yaml").write_text("type: numeric\nabs_tol: -1\n")
    result = rft_grade("--grader", str(tmp_path / "bad.yaml"), "--data", items, "--samples", items)
    assert (
        result.returncode == 2
        and "grader.numeric.abs_tol: Input should be greater than or equal to 0" in result.stderr
    )

    (tmp_path / "judge.json").write_text(
        json.dumps(
            {
                "type": "score_model",
                "name": "judge",
                "model": "gpt-4o",
                "input": [{"role": "user", "content": "{{sample.output_text}}"}],
            }
        )
    )
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"id": "sum", "output_text": "3"}])
    result = rft_grade("--grader", str(tmp_path / "judge.json"), "--data", items, "--samples", answers)
    assert (
        result.returncode == 2
        and "model 'gpt-4o' is neither a local model directory" in result.stderr
        and "give base_url" in result.stderr
    )

    (tmp_path / "spec.yaml").write_text(SPEC)
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": "sum", "output_text": "x"}, {"text": "no id"}])
    result = rft_grade("--grader", str(tmp_path / "spec.yaml"), "--data", items, "--samples", samples)
    assert result.returncode == 2 and f"{samples}:2: needs 'id'" in result.stderr

    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": "elsewhere", "output_text": "x"}])
    result = rft_grade("--grader", str(tmp_path / "spec.yaml"), "--data", items, "--samples", samples)
    assert result.returncode == 2 and "no item in" in result.stderr and "elsewhere" in result.stderr
