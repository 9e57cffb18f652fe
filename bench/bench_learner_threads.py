"""Does it pay for the learner to take the cores the rollout worker leaves idle? The demo job,
run twice on this box, one run after the other: `learner.threads: fixed` then `follow_free`.

    .venv/bin/python bench/bench_learner_threads.py [--steps 10] [--config examples/arithmetic.yaml]

Each run is `rft run CONFIG` with `steps` shortened, no held-out eval and one checkpoint at the
end (they are the same in both and only dilute the difference), in a run root under /tmp. Prints
per run the median learner seconds per step, the median step-to-step wall time, the job's wall
time and the learner's mean thread count, then lines that start exactly
`learner seconds/step ratio follow_free/fixed: X` and `job wall ratio follow_free/fixed: X`
(below 1 = follow_free is faster). Run it alone on the machine: other load is what the governor
reacts to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(config: str, steps: int, threads: str, run_root: Path) -> dict:
    overrides = {
        "steps": steps,
        "learner.threads": threads,
        "data.heldout": "null",
        "eval.at_start": "false",
        "checkpoint.every_steps": 1000,
        "metrics.port": 0,
        "run_root": str(run_root),
        "name": f"threads-{threads}",
    }
    command = [sys.executable, "-m", "services.cli", "run", config]
    for field, value in overrides.items():
        command += ["-o", f"{field}={value}"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    steps_seen = [
        json.loads(line)
        for line in (run_root / f"threads-{threads}" / "metrics.jsonl").read_text().splitlines()
        if '"learner_step_seconds"' in line
    ]
    times = [s["time"] for s in steps_seen]
    return {
        "learner_seconds": statistics.median(s["learner_step_seconds"] for s in steps_seen),
        "step_wall": statistics.median(b - a for a, b in zip(times, times[1:])),
        "job_wall": wall,
        "threads": statistics.mean(s.get("learner_threads", float("nan")) for s in steps_seen),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="examples/arithmetic.yaml")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="rft-bench-threads-") as tmp:
        for threads in ("fixed", "follow_free"):
            results[threads] = run_job(args.config, args.steps, threads, Path(tmp))
            r = results[threads]
            print(
                f"{threads}: learner {r['learner_seconds']:.1f} s/step (median), step wall "
                f"{r['step_wall']:.1f} s, job {r['job_wall']:.0f} s, learner threads {r['threads']:.2f}",
                flush=True,
            )
    fixed, follow = results["fixed"], results["follow_free"]
    learner_ratio = follow["learner_seconds"] / fixed["learner_seconds"]
    print(f"learner seconds/step ratio follow_free/fixed: {learner_ratio:.2f}")
    print(f"job wall ratio follow_free/fixed: {follow['job_wall'] / fixed['job_wall']:.2f}")


if __name__ == "__main__":
    main()
