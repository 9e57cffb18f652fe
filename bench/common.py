"""What the benches share: the rollout benches' command line (model, engine, workload), and the
held-out evaluation of the demo task's trained adapters (`rft eval`, greedy, at the demo's 48 new
tokens) with which items each changed right -> wrong and wrong -> right."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "arithmetic"
SOLVED = 1.0 - 1e-6
DEMO_MAX_NEW_TOKENS = 48  # examples/arithmetic.yaml's rollout.max_new_tokens


def rollout_bench_parser(doc: str) -> argparse.ArgumentParser:
    """--model, --engine, --prompts, --samples, --repeats; a bench adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def step_metrics(run_dir: Path) -> list[dict]:
    """A finished run's metrics.jsonl lines of its training steps (the ones that count groups)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "signal_groups" in m]


def flat_share(steps: list[dict]) -> float:
    """The share of the steps' groups whose rewards were all equal (nan: no groups counted)."""
    groups = sum(m["zero_signal_groups"] + m["signal_groups"] for m in steps)
    return sum(m["zero_signal_groups"] for m in steps) / groups if groups else float("nan")


def evaluate(adapter: Path | None, data: Path, limit: int, output: Path) -> dict[str, dict]:
    """rft eval, greedy: per item (id -> its result line)."""
    command = [sys.executable, "-m", "services.cli", "eval", "--data", str(data)]
    command += ["--grader", str(EXAMPLE / "grader.py"), "--limit", str(limit), "--output", str(output)]
    command += ["--max-new-tokens", str(DEMO_MAX_NEW_TOKENS)]
    subprocess.run(
        command + (["--adapter", str(adapter)] if adapter else []), check=True, capture_output=True
    )
    return {row["id"]: row for row in map(json.loads, output.read_text().splitlines())}


def measures(results: dict[str, dict]) -> dict[str, set[str]]:
    """The items each measure counts as right: accuracy (right in the format) and lenient."""
    return {
        "accuracy": {i for i, r in results.items() if r["reward"] >= SOLVED},
        "lenient": {i for i, r in results.items() if r["components"].get("lenient_correct", 0) >= 1},
    }


def compare(base: dict, trained: dict, n: int) -> str:
    cells = []
    for measure, right in trained.items():
        before = base[measure]
        cells.append(
            f"{measure} {len(before) / n:.3f} -> {len(right) / n:.3f} "
            f"(right->wrong {len(before - right)}, wrong->right {len(right - before)})"
        )
    return "; ".join(cells)
