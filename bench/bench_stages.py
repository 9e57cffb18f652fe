"""Stage kinds against each other on the demo task, in the same wall-clock budget, on this box.

Each method is the demo job (examples/arithmetic.yaml: the embedded SmolLM2-135M-Instruct, 8
prompts x 8 samples a step, LoRA r16) with `stages:` and `max_minutes`, run one after the other
(alone on the machine); then the base model and every adapter are evaluated by `rft eval`
(greedy, 48 new tokens) on the same held-out items and on their paraphrases (no format
instruction): accuracy, lenient accuracy (the right number in any format), and per item which
changed right -> wrong and wrong -> right against the base.

  grpo             the demo as it is
  rejection->grpo  rejection_sft (keep the samples with the right number, any format: reward >=
                   0.3) for --rejection-steps steps, then grpo
  dpo-online       dpo on each step's best and worst sample of a group
  distill          on-policy distillation from the same base prompted with four worked examples
                   (examples/arithmetic/few_shot.jsonl) the student never sees

    .venv/bin/python bench/bench_stages.py [--minutes 6] [--limit 200] [--methods grpo,distill]
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
from bench.common import EXAMPLE, compare, evaluate, measures  # noqa: E402

LONG = 100_000  # a stage's steps: the budget ends it


def methods(rejection_steps: int) -> dict[str, str]:
    """Method -> its `stages` (YAML)."""
    few_shot = EXAMPLE / "few_shot.jsonl"
    return {
        "grpo": f"[{{kind: grpo, steps: {LONG}}}]",
        "rejection->grpo": f"[{{kind: rejection_sft, steps: {rejection_steps}, min_reward: 0.3}}, "
        f"{{kind: grpo, steps: {LONG}}}]",
        "dpo-online": f"[{{kind: dpo, steps: {LONG}, online: true}}]",
        "distill": f"[{{kind: distill, steps: {LONG}, teacher: {{few_shot: {few_shot}}}}}]",
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of each method")
    parser.add_argument("--limit", type=int, default=200, help="held-out items evaluated")
    parser.add_argument("--rejection-steps", type=int, default=8)
    parser.add_argument("--methods", default=",".join(methods(0)), help="comma-separated, in run order")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-stages")
    return parser.parse_args()


def file_name(method: str) -> str:
    return method.replace(">", "").replace("-", "_")


def train(method: str, stages: str, minutes: float, out: Path) -> tuple[Path, int, float]:
    name = f"{file_name(method)}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    command = [sys.executable, "-m", "services.cli", "run", str(ROOT / "examples" / "arithmetic.yaml")]
    overrides = [f"name={name}", f"run_root={out}", f"max_minutes={minutes}", f"stages={stages}"]
    overrides += ["steps=null", "data.heldout=null", "eval.extra_heldout={}"]  # evaluated alike, below
    subprocess.run(command + [arg for o in overrides for arg in ("-o", o)], check=True)
    summary = json.loads((out / name / "summary.json").read_text())
    return Path(summary["adapter"]), summary["steps"], time.monotonic() - started


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {m: methods(args.rejection_steps)[m] for m in args.methods.split(",")}
    trained = {method: train(method, stages, args.minutes, args.out) for method, stages in chosen.items()}
    sets = {"held-out": EXAMPLE / "heldout.jsonl", "paraphrased": EXAMPLE / "heldout_paraphrased.jsonl"}
    n, gains = args.limit, {}
    for label, data in sets.items():
        adapters = {"base": None} | {method: adapter for method, (adapter, _, _) in trained.items()}
        right = {
            name: measures(evaluate(adapter, data, n, args.out / f"eval-{label}-{file_name(name)}.jsonl"))
            for name, adapter in adapters.items()
        }
        for method in trained:
            print(f"{label} {method}: {compare(right['base'], right[method], n)}")
            for measure in ("accuracy", "lenient"):
                points = 100 * (len(right[method][measure]) - len(right["base"][measure])) / n
                gains.setdefault(method, []).append(f"{label} {measure} {points:+.1f}")
    print(f"budget {args.minutes:g} min each, n={n}")
    for method, (_, steps, seconds) in trained.items():
        print(f"{method}: {steps} steps in {seconds:.0f} s wall; gain (points): {', '.join(gains[method])}")


if __name__ == "__main__":
    main()
