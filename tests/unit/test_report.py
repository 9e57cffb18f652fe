"""`rft report RUN_DIR` on a small run directory in the driver's formats: metrics.jsonl written by
the real RunMetrics, samples.jsonl and summary.json with the driver's fields."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app
from services.orchestrator.metrics import RunMetrics
from services.tools.report import pick_samples, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_REWARDS = {1: 0.125, 2: 0.25, 3: 0.4375}


def write_run(run_dir: Path) -> None:
    """Three steps, as services/driver.py::run_job records them."""
    metrics = RunMetrics("synthetic", run_dir, port=0)
    try:
        metrics.record(0, {"heldout_accuracy": 0.05, "heldout_reward_mean": 0.1})
        for step, reward in STEP_REWARDS.items():
            metrics.record(
                step,
                {
                    "reward_mean": reward,
                    "reward_std": 0.2,
                    "completion_length_mean": 30.0 + step,
                    "truncated_completions_fraction": 0.5,
                    "rollout_tokens_per_second": 150.0,
                    "zero_signal_groups": 2,
                    "staleness_max": 1,
                    "loss": 0.01,
                    "grad_norm": 0.3,
                    "is_weight_mean": 1.0,
                    "is_weight_max": 1.4,
                    "mismatch_kl": 0.002,
                    "entropy": 0.8 - 0.1 * step,
                    "kl_ref": 0.001 * step,
                    "tokens": 1900,
                    "step_seconds": 50.0,
                    "skipped": False,
                    "learner_step_seconds": 50.0,
                    "clip_fraction": 0.0,
                    "is_truncated_fraction": 0.0,
                    "weight_sync_seconds": 0.4,
                    "step": step,
                    "policy_version": step,
                    **({"heldout_accuracy": 0.2, "heldout_reward_mean": 0.3} if step == 3 else {}),
                },
                {
                    "grader_errors": int(step == 3),
                    "stale_rollouts_dropped": 0,
                    "samples_trained": 4,
                    "skipped_steps": 0,
                },
            )
    finally:
        metrics.close()
    with (run_dir / "samples.jsonl").open("w") as f:
        for step in STEP_REWARDS:
            for k in range(4):
                correct = float(k == 0)
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "sample_id": f"train-0000{step}#{k}",
                            "policy_version": step - 1,
                            "worker_id": "rollout-0",
                            "text": f"step {step} sample {k}: 3 < 4 so\nAnswer: {7 + k}",
                            "reward": 0.2 + 0.8 * correct,
                            "components": {"format": 1.0, "correct": correct, "lenient_correct": correct},
                            "grader_error": "TimeoutError: grader exceeded 5 s"
                            if (step, k) == (3, 3)
                            else None,
                            "hack_flags": ["answer_only"] if (step, k) == (3, 2) else [],
                            "trained": k != 3,
                        }
                    )
                    + "\n"
                )
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "job": "synthetic",
                "steps": 3,
                "policy_version": 3,
                "heldout_base": {"accuracy": 0.05, "reward_mean": 0.1, "count": 20},
                "heldout_final": {"accuracy": 0.2, "reward_mean": 0.3, "count": 20},
                "heldout_sets": {
                    "paraphrased": {
                        "base": {"accuracy": 0.0, "component_lenient_correct": 0.1, "count": 20},
                        "final": {"accuracy": 0.05, "component_lenient_correct": 0.3, "count": 20},
                    }
                },
                "adapter": str(run_dir / "adapter"),
            }
        )
    )


def rft(*args: str):
    return CliRunner().invoke(app, list(args))


def test_report_writes_plots_and_a_page_with_curves_and_samples(tmp_path):
    run_dir = tmp_path / "runs" / "synthetic"
    write_run(run_dir)
    result = rft("report", str(run_dir), "--samples", "4")
    assert result.exit_code == 0, result.output
    report_dir = run_dir / "report"
    assert Path(result.output.strip()) == report_dir / "index.html"
    for stem in ("reward", "importance_sampling", "policy", "throughput", "signal", "heldout"):
        png = report_dir / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, stem
    page = (report_dir / "index.html").read_text()
    assert '<img src="reward.png"' in page and '<img src="importance_sampling.png"' in page
    # the curves' numbers, per step, and the summary
    assert "<th>reward_mean</th>" in page and "<td>0.4375</td>" in page and "<td>0.125</td>" in page
    assert "<td>accuracy</td><td>0.05</td><td>0.2</td>" in page
    # a second held-out set, with the grader's components (lenient accuracy) base and final
    assert (
        "<th>held-out paraphrased</th>" in page and "<td>lenient_correct</td><td>0.1</td><td>0.3</td>" in page
    )
    # samples of the first and last step, escaped, with their grader breakdown and error
    assert "step 1 sample 0: 3 &lt; 4 so\nAnswer: 7" in page and "step 3 sample" in page
    assert "correct = 1" in page and "lenient_correct = 0" in page
    assert "<h3>Step 1: 4 rollouts, mean reward 0.400, 0 grader errors, 0 flagged as hacks</h3>" in page
    assert "3 grader errors" not in page and "1 grader errors, 1 flagged as hacks" in page
    assert "grader error: TimeoutError: grader exceeded 5 s" in page and "hack flag: answer_only" in page
    assert "policy version 0, worker rollout-0, trained True" in page
    assert "step 2 sample" not in page, "only the first and last step are shown"


def test_shown_samples_spread_over_the_reward_range():
    samples = [{"step": 1, "sample_id": str(i), "reward": i / 10} for i in range(11)]
    assert [s["sample_id"] for s in pick_samples(samples, 3)] == ["10", "5", "0"]
    assert len(pick_samples(samples, 20)) == 11


def test_report_output_option_and_a_run_without_samples(tmp_path):
    run_dir = tmp_path / "runs" / "early"
    metrics = RunMetrics("early", run_dir, port=0)
    metrics.record(0, {"heldout_accuracy": 0.0, "heldout_reward_mean": 0.03})
    metrics.close()
    result = rft("report", str(run_dir), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "index.html").read_text()
    assert "No samples.jsonl" in page and "No summary.json" in page and '<img src="reward.png"' in page


def test_report_names_a_bad_line_and_a_missing_run(tmp_path):
    run_dir = tmp_path / "runs" / "broken"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.1}\n{"step": 2, "reward_me\n')
    result = rft("report", str(run_dir))
    assert result.exit_code == 2
    assert f"{run_dir / 'metrics.jsonl'}:2: not a JSON line" in result.output

    result = rft("report", str(tmp_path / "runs" / "missing"))
    assert result.exit_code == 2 and "metrics.jsonl not found" in result.output


def test_an_episode_shows_its_turns_after_the_prompt(tmp_path):
    run_dir = tmp_path / "runs" / "agent"
    run_dir.mkdir(parents=True)
    turns = [
        {"role": "system", "content": "You can use a calculator."},
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": '<tool_call>{"name": "calculate"}</tool_call>', "policy_version": 3},
        {"role": "tool", "name": "calculate", "content": "84 <b>"},
        {"role": "assistant", "content": "Answer: 84", "policy_version": 3},
    ]
    record = {"step": 1, "sample_id": "q#0", "text": "Answer: 84", "reward": 1.0, "turns": turns}
    (run_dir / "samples.jsonl").write_text(json.dumps({**record, "finish_reason": "stop"}) + "\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 1.0}) + "\n")
    page = write_report(run_dir).read_text()
    assert "<i>assistant (policy version 3)</i>" in page and "84 &lt;b&gt;" in page
    assert "<i>tool</i>" in page and "episode ended: stop" in page
    assert "You can use a calculator." not in page  # the prompt is the group's, not the episode's


def test_stage_boundaries_are_where_the_stage_changes():
    from services.tools.report import stage_boundaries, steps_table

    records = [{"step": 0, "heldout_accuracy": 0.1}] + [
        {"step": s, "stage": 1 if s <= 2 else 2 if s <= 4 else 3} for s in range(1, 7)
    ]
    assert stage_boundaries(steps_table(records)) == [3, 5]
    assert stage_boundaries(steps_table([{"step": 1, "loss": 1.0}])) == []  # no stages
