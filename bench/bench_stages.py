"""Recipes for the demo task against each other, in the same wall-clock budget, on this box.

Each method is the demo job (examples/arithmetic.yaml: the embedded SmolLM2-135M-Instruct, 8
prompts x 8 samples a step, LoRA r16) with `stages:`, its own overrides and `max_minutes`, run one
after the other (alone on the machine); then the base model and every adapter are evaluated by
`rft eval` (greedy, 48 new tokens, the demo's grader) on the same held-out items and on their
paraphrases (no format instruction): accuracy, lenient accuracy (the right number in any format),
per item which changed right -> wrong and wrong -> right against the base, and the gain per
minute of training budget.

  grpo              the demo's stage with the partial-credit reward (0.2 of it for the format alone)
  grpo+dynamic      the same with dynamic sampling (algorithm.min_signal_groups 6)
  grpo+strict       grpo with the format's credit paid only with the right number (the grader's
                    FORMAT_NEEDS_RIGHT_NUMBER)
  rejection->grpo   rejection_sft (keep the samples with the right number, any format: reward >=
                    0.3) for --rejection-steps steps, then grpo
  dpo-online        dpo on each step's best and worst sample of a group
  dpo-online+strict the same on the strict reward
  distill           on-policy distillation from the same base prompted with four worked examples
                    (examples/arithmetic/few_shot.jsonl) the student never sees

    .venv/bin/python bench/bench_stages.py [--minutes 6] [--limit 200] [--methods grpo,distill]
        [--reuse grpo=runs/bench-stages/grpo-...]   # a run made before, evaluated with the rest
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import EXAMPLE, compare, evaluate, flat_share, measures, step_metrics  # noqa: E402

LONG = 100_000  # a stage's steps: the budget ends it
DYNAMIC = "algorithm.min_signal_groups=6"
STRICT = "strict"  # stands for the strict grader's path, written into the run root


def methods(rejection_steps: int) -> dict[str, tuple[str, list[str]]]:
    """Method -> its `stages` (YAML) and its other overrides."""
    few_shot = EXAMPLE / "few_shot.jsonl"
    rejection = f"{{kind: rejection_sft, steps: {rejection_steps}, min_reward: 0.3}}"
    grpo, dpo_online = f"[{{kind: grpo, steps: {LONG}}}]", f"[{{kind: dpo, steps: {LONG}, online: true}}]"
    return {
        "grpo": (grpo, []),
        "grpo+dynamic": (grpo, [DYNAMIC]),
        "grpo+strict": (grpo, [STRICT]),
        "rejection->grpo": (f"[{rejection}, {{kind: grpo, steps: {LONG}}}]", []),
        "dpo-online": (dpo_online, []),
        "dpo-online+strict": (dpo_online, [STRICT]),
        "distill": (f"[{{kind: distill, steps: {LONG}, teacher: {{few_shot: {few_shot}}}}}]", []),
    }


def strict_grader(out: Path) -> Path:
    """The demo's grader with the format's credit paid only with the right number."""
    source = (EXAMPLE / "grader.py").read_text()
    assert "\nFORMAT_NEEDS_RIGHT_NUMBER = False\n" in source, "the grader's switch moved"
    path = out / "grader_strict.py"
    path.write_text(
        source.replace("\nFORMAT_NEEDS_RIGHT_NUMBER = False\n", "\nFORMAT_NEEDS_RIGHT_NUMBER = True\n")
    )
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of each method")
    parser.add_argument("--limit", type=int, default=200, help="held-out items evaluated")
    parser.add_argument("--rejection-steps", type=int, default=8)
    parser.add_argument("--methods", default=",".join(methods(0)), help="comma-separated, in run order")
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="METHOD=RUN_DIR",
        help="evaluate a run made before with the same --minutes instead of training it again",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-stages")
    return parser.parse_args()


def file_name(method: str) -> str:
    return method.replace(">", "").replace("-", "_").replace("+", "_")


def train(method: str, recipe: tuple[str, list[str]], minutes: float, out: Path) -> dict:
    """Runs the method's job (`read_run`)."""
    stages, extra = recipe
    name = f"{file_name(method)}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    command = [sys.executable, "-m", "services.cli", "run", str(ROOT / "examples" / "arithmetic.yaml")]
    overrides = [f"name={name}", f"run_root={out}", f"max_minutes={minutes}", f"stages={stages}"]
    overrides += ["steps=null", "data.heldout=null", "eval.extra_heldout={}"]  # evaluated alike, below
    overrides += [f"reward.grader.source={strict_grader(out)}" if o == STRICT else o for o in extra]
    subprocess.run(command + [arg for o in overrides for arg in ("-o", o)], check=True)
    return read_run(out / name, time.monotonic() - started)


def read_run(run_dir: Path, seconds: float) -> dict:
    """A finished run: its adapter, steps, wall seconds and flat share of groups."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "adapter": Path(summary["adapter"]),
        "steps": summary["steps"],
        "seconds": seconds,
        "flat_share": flat_share(step_metrics(run_dir)),
    }


def reused(spec: str) -> tuple[str, dict]:
    """--reuse METHOD=RUN_DIR: a run this bench made before (wall: config.yaml to summary.json)."""
    method, _, run_dir = spec.partition("=")
    run_dir = Path(run_dir).resolve()
    seconds = (run_dir / "summary.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    return method, read_run(run_dir, seconds)


def main() -> None:
    args = parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {m: methods(args.rejection_steps)[m] for m in args.methods.split(",")}
    trained = dict(map(reused, args.reuse))
    trained |= {method: train(method, recipe, args.minutes, args.out) for method, recipe in chosen.items()}
    sets = {"held-out": EXAMPLE / "heldout.jsonl", "paraphrased": EXAMPLE / "heldout_paraphrased.jsonl"}
    n, gains = args.limit, {}
    for label, data in sets.items():
        adapters = {"base": None} | {method: run["adapter"] for method, run in trained.items()}
        right = {
            name: measures(evaluate(adapter, data, n, args.out / f"eval-{label}-{file_name(name)}.jsonl"))
            for name, adapter in adapters.items()
        }
        for method in trained:
            print(f"{label} {method}: {compare(right['base'], right[method], n)}")
            for measure in ("accuracy", "lenient"):
                points = 100 * (len(right[method][measure]) - len(right["base"][measure])) / n
                per_minute = points / args.minutes
                gains.setdefault(method, []).append(
                    f"{label} {measure} {points:+.1f} ({per_minute:+.2f}/min)"
                )
    print(f"budget {args.minutes:g} min each, n={n}")
    for method, run in trained.items():
        print(
            f"{method}: {run['steps']} steps in {run['seconds']:.0f} s wall, flat groups "
            f"{run['flat_share']:.2f}; gain (points): {', '.join(gains[method])}"
        )


if __name__ == "__main__":
    main()
