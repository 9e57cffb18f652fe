"""bench/gpu_check_report.py on a small synthetic run directory: the medians it prints are the
ones of the step lines (the held-out line before step 1 and steps without a sync left out)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check_report.py"
_spec = importlib.util.spec_from_file_location("gpu_check_report", SCRIPT)
gpu_check_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check_report)

HELDOUT_BASE = {"accuracy": 0.0, "reward_mean": 0.036, "count": 100}
HELDOUT_FINAL = {"accuracy": 0.12, "reward_mean": 0.25, "count": 100}


def write_run(run_dir: Path, lines: list[dict], summary: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        (run_dir / "summary.json").write_text(
            json.dumps({"heldout_base": HELDOUT_BASE, "heldout_final": HELDOUT_FINAL})
        )
    return run_dir


def step(n: int, tokens_per_s: float, learner_s: float, sync_s: float | None) -> dict:
    line = {"step": n, "rollout_tokens_per_second": tokens_per_s, "learner_step_seconds": learner_s}
    if sync_s is not None:
        line["weight_sync_seconds"] = sync_s
    return line


def synthetic_run(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "runs" / "gpu-check",
        [
            {"step": 0, "heldout_accuracy": 0.0, "heldout_reward_mean": 0.036},  # before step 1
            step(1, 1000.0, 4.0, 0.050),
            step(2, 3000.0, 1.0, 0.010),
            step(3, 2000.0, 2.0, None),  # no new version published: no sync time
            step(4, 5000.0, 3.0, 0.030),
        ],
    )


def test_medians_are_over_the_step_lines(tmp_path):
    report = gpu_check_report.build_report(synthetic_run(tmp_path))
    assert report["steps"] == 4
    assert report["rollout_tokens_per_second"] == pytest.approx(2500.0)  # median of 1000, 2000, 3000, 5000
    assert report["weight_sync_seconds"] == pytest.approx(30.0)  # ms: median of 50, 10, 30
    assert report["learner_step_seconds"] == pytest.approx(2.5)  # median of 1, 2, 3, 4
    assert report["heldout_before"] == HELDOUT_BASE and report["heldout_after"] == HELDOUT_FINAL


def test_printed_lines_and_output_file(tmp_path, capsys):
    output = tmp_path / "results.txt"
    assert gpu_check_report.main([str(synthetic_run(tmp_path)), "--output", str(output)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == ["rollout tokens/s: 2500.0", "weight-sync ms: 30.0", "learner step seconds: 2.5"]
    assert "held-out before: accuracy 0.000, mean reward 0.036 (n=100)" in printed
    assert "held-out after: accuracy 0.120, mean reward 0.250 (n=100)" in printed
    assert output.read_text().splitlines() == printed


def test_a_run_without_summary_fails_with_the_reason(tmp_path, capsys):
    run_dir = write_run(tmp_path / "unfinished", [step(1, 10.0, 1.0, 0.1)], summary=False)
    assert gpu_check_report.main([str(run_dir)]) == 1
    assert "summary.json not found" in capsys.readouterr().err


def test_a_run_without_steps_fails_with_the_reason(tmp_path):
    run_dir = write_run(tmp_path / "empty", [{"step": 0, "heldout_accuracy": 0.0}])
    with pytest.raises(gpu_check_report.ReportError, match="no training step"):
        gpu_check_report.build_report(run_dir)
