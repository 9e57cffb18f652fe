"""The numbers `make gpu-check` (bench/gpu_check.sh) prints, read from one run directory.

From `metrics.jsonl` (one line per step, written by services/orchestrator/metrics.py with the
keys of services/orchestrator/records.py::step_metrics), the median over the run's steps of
- `rollout_tokens_per_second`: completion tokens / generation seconds of the step,
- `weight_sync_seconds`: the publish of the step's new version to the rollout workers (only
  steps that published one have it),
- `learner_step_seconds`: the learner's train step;
and from `summary.json` the held-out score before and after training.

    python bench/gpu_check_report.py runs/<job> [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# metrics.jsonl key -> (label, factor from the stored unit to the printed one)
MEDIANS = {
    "rollout_tokens_per_second": ("rollout tokens/s", 1.0),
    "weight_sync_seconds": ("weight-sync ms", 1000.0),
    "learner_step_seconds": ("learner step seconds", 1.0),
}


class ReportError(RuntimeError):
    """The run directory lacks what the report needs (the job failed or is still running)."""


def step_lines(metrics_path: Path) -> list[dict]:
    """The training steps' lines; the held-out line written before step 1 has no rollouts."""
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path} not found: did the job start?")
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "rollout_tokens_per_second" in line]
    if not steps:
        raise ReportError(f"{metrics_path} has no training step")
    return steps


def median_of(steps: list[dict], key: str) -> float | None:
    values = [line[key] for line in steps if isinstance(line.get(key), (int, float))]
    return statistics.median(values) if values else None


def build_report(run_dir: Path) -> dict:
    steps = step_lines(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(f"{summary_path} not found: the job did not finish")
    summary = json.loads(summary_path.read_text())
    report = {"run_dir": str(run_dir), "steps": len(steps)}
    for key, (_, factor) in MEDIANS.items():
        value = median_of(steps, key)
        report[key] = None if value is None else value * factor
    report["heldout_before"] = summary.get("heldout_base") or {}
    report["heldout_after"] = summary.get("heldout_final") or {}
    return report


def _heldout(score: dict) -> str:
    if not score:
        return "n/a"
    return f"accuracy {score['accuracy']:.3f}, mean reward {score['reward_mean']:.3f} (n={score['count']})"


def format_report(report: dict) -> list[str]:
    lines = []
    for key, (label, _) in MEDIANS.items():
        value = report[key]
        lines.append(f"{label}: {'n/a' if value is None else f'{value:.1f}'}")
    lines.append(f"median over {report['steps']} steps of {report['run_dir']}")
    lines.append(f"held-out before: {_heldout(report['heldout_before'])}")
    lines.append(f"held-out after: {_heldout(report['heldout_after'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output", type=Path, help="also append the lines to this file")
    args = parser.parse_args(argv)
    try:
        lines = format_report(build_report(args.run_dir))
    except ReportError as e:
        print(f"gpu-check report: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    if args.output:
        with args.output.open("a") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
