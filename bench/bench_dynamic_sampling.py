"""How much GRPO signal does a step carry with dynamic sampling, and what does it cost? The demo
job run twice, one run after the other: as configured, then with
`algorithm.min_signal_groups` (and, with --difficulty-filter, `data.difficulty_filter`).

    .venv/bin/python bench/bench_dynamic_sampling.py [--steps 10] [--min-signal-groups 6]
        [--difficulty-filter] [--config examples/arithmetic.yaml] [-o section.field=value ...]

Each run is `rft run CONFIG` with `steps` shortened, no held-out eval and one checkpoint at the
end, in a run root under /tmp. Prints per step of each run the flat groups, the groups with
signal, the extra prompts and the skipped ones, then lines that start exactly
`signal groups per step off/on: A / B`, `flat share of groups off/on: A / B`,
`samples trained per step ratio on/off: X` and `job wall ratio on/off: X`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import flat_share, step_metrics  # noqa: E402


def run_job(config: str, steps: int, name: str, run_root: Path, overrides: list[str]) -> dict:
    fixed = {
        "steps": steps,
        "data.heldout": "null",
        "eval.at_start": "false",
        "checkpoint.every_steps": 1000,
        "metrics.port": 0,
        "run_root": str(run_root),
        "name": name,
    }
    command = [sys.executable, "-m", "services.cli", "run", config]
    for override in [f"{field}={value}" for field, value in fixed.items()] + overrides:
        command += ["-o", override]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return {"steps": step_metrics(run_root / name), "job_wall": wall}


def report(name: str, run: dict) -> None:
    print(f"{name}: job {run['job_wall']:.0f} s")
    for m in run["steps"]:
        print(
            f"  step {m['step']}: flat {m['zero_signal_groups']}  signal {m['signal_groups']}  "
            f"extra {m.get('extra_prompts', 0)}  skipped {m.get('filter_skipped_prompts', 0)}  "
            f"trained {m['samples_trained_count']}",
            flush=True,
        )


def mean_of(run: dict, key: str) -> float:
    return statistics.mean(m[key] for m in run["steps"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="examples/arithmetic.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--min-signal-groups", type=int, default=6)
    parser.add_argument("--difficulty-filter", action="store_true", help="also data.difficulty_filter")
    parser.add_argument("-o", "--override", action="append", default=[], help="for both runs")
    args = parser.parse_args()
    with_dynamic = [f"algorithm.min_signal_groups={args.min_signal_groups}"]
    if args.difficulty_filter:
        with_dynamic.append("data.difficulty_filter={visits: 2}")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="rft-bench-dynamic-") as tmp:
        for name, extra in (("off", []), ("on", with_dynamic)):
            runs[name] = run_job(args.config, args.steps, f"dynamic-{name}", Path(tmp), args.override + extra)
            report(name, runs[name])
    off, on = runs["off"], runs["on"]
    flat = {name: flat_share(run["steps"]) for name, run in runs.items()}
    signal = {name: mean_of(run, "signal_groups") for name, run in runs.items()}
    print(f"signal groups per step off/on: {signal['off']:.2f} / {signal['on']:.2f}")
    print(f"flat share of groups off/on: {flat['off']:.2f} / {flat['on']:.2f}")
    trained = mean_of(on, "samples_trained_count") / max(mean_of(off, "samples_trained_count"), 1e-9)
    print(f"samples trained per step ratio on/off: {trained:.2f}")
    print(f"job wall ratio on/off: {on['job_wall'] / off['job_wall']:.2f}")


if __name__ == "__main__":
    main()
