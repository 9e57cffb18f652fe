"""rft against TRL's GRPOTrainer on the same work, in the same wall-clock budget, on this box.

Same model (the converted embedded SmolLM2-135M-Instruct), training items and reward function (the
demo's: examples/arithmetic/), sampling (8 prompts x 8 samples a step, temperature 0.7, full
vocabulary, <= 48 new tokens), LoRA r16 q/k/v/o, the demo's lr and dtype (examples/arithmetic.yaml;
dtype auto as rft resolves it on this box), no KL.
rft runs the demo job with `max_minutes`; TRL runs bench/trl_grpo_run.py (GRPOTrainer, installed
here into its own venv, pinned: TRL_PIN, and the torch/transformers/peft versions of rft's venv)
under the same budget rule. One after the other, alone on the machine. Both adapters, and the base
model, are then evaluated by `rft eval` (greedy) on the same held-out items and on their
paraphrases (no format instruction): accuracy, lenient accuracy (the right number in any format),
and per item which changed right -> wrong and wrong -> right against the base.

    .venv/bin/python bench/bench_vs_trl.py [--minutes 10] [--limit 200]
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
from core.dtypes import resolve_dtype  # noqa: E402
from services.config import load_config  # noqa: E402

TRL_PIN = "trl==1.16.0"
TRL_VENV = ROOT / ".venv-trl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each trainer")
    parser.add_argument("--limit", type=int, default=200, help="held-out items evaluated")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-vs-trl")
    return parser.parse_args()


def ensure_trl_venv() -> Path:
    """.venv-trl with TRL pinned and rft's own torch, transformers and peft versions (so the
    comparison is of the trainers, not of library versions); made once."""
    import peft
    import torch
    import transformers

    pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    pins += [f"peft=={peft.__version__}", TRL_PIN, "datasets", "accelerate"]
    marker = TRL_VENV / ".pins"
    if marker.is_file() and marker.read_text() == " ".join(pins):
        return TRL_VENV / "bin" / "python"
    print(f"== installing {' '.join(pins)} into {TRL_VENV}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    python = TRL_VENV / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", pins[0]], check=True)  # the CPU build first
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    marker.write_text(" ".join(pins))
    return python


def train_rft(minutes: float, out: Path) -> tuple[Path, int, float]:
    name = f"rft-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    command = [sys.executable, "-m", "services.cli", "run", str(ROOT / "examples" / "arithmetic.yaml")]
    overrides = [f"name={name}", f"run_root={out}", f"max_minutes={minutes}", "steps=10000"]
    overrides += ["data.heldout=null", "eval.extra_heldout={}"]  # both are evaluated alike, below
    subprocess.run(command + [arg for o in overrides for arg in ("-o", o)], check=True)
    summary = json.loads((out / name / "summary.json").read_text())
    return Path(summary["adapter"]), summary["steps"], time.monotonic() - started


def train_trl(python: Path, model: Path, minutes: float, out: Path) -> tuple[Path, int, float]:
    adapter = out / f"trl-{time.strftime('%Y%m%d-%H%M%S')}-adapter"
    command = [str(python), str(ROOT / "bench" / "trl_grpo_run.py"), "--model", str(model)]
    command += ["--train", str(EXAMPLE / "train.jsonl"), "--grader", str(EXAMPLE / "grader.py")]
    command += ["--minutes", str(minutes), "--output", str(adapter)]
    demo = load_config(ROOT / "examples" / "arithmetic.yaml")
    # the dtype rft's processes pick on this box (model.dtype auto), so both compute alike
    command += ["--learning-rate", str(demo.learner.learning_rate)]
    command += ["--dtype", resolve_dtype(demo.model.dtype)]
    finished = subprocess.run(command, check=True, capture_output=True, text=True)
    line = next(line for line in finished.stdout.splitlines() if line.startswith("trl-result: "))
    result = json.loads(line.removeprefix("trl-result: "))
    return adapter, result["steps"], result["seconds"]


def main() -> None:
    args = parse_args()
    from core.model_store import resolve_model_path

    args.out.mkdir(parents=True, exist_ok=True)
    python = ensure_trl_venv()
    rft_adapter, rft_steps, rft_seconds = train_rft(args.minutes, args.out)
    trl_adapter, trl_steps, trl_seconds = train_trl(python, resolve_model_path(None), args.minutes, args.out)
    sets = {"held-out": EXAMPLE / "heldout.jsonl", "paraphrased": EXAMPLE / "heldout_paraphrased.jsonl"}
    gains = {}
    for label, data in sets.items():
        models = {"base": None, "rft": rft_adapter, "trl": trl_adapter}
        right = {
            name: measures(evaluate(adapter, data, args.limit, args.out / f"eval-{label}-{name}.jsonl"))
            for name, adapter in models.items()
        }
        n = args.limit
        for name in ("rft", "trl"):
            print(f"{label} {name}: {compare(right['base'], right[name], n)}")
        for measure in ("accuracy", "lenient"):
            points = [
                100 * (len(right[name][measure]) - len(right["base"][measure])) / n for name in ("rft", "trl")
            ]
            gains[label, measure] = "/".join(f"{p:+.1f}" for p in points)
    print(f"budget {args.minutes:g} min each; wall rft {rft_seconds:.0f} s, trl {trl_seconds:.0f} s")
    print(f"steps in budget rft/trl: {rft_steps}/{trl_steps}")
    print(f"held-out gain rft/trl (points): {gains['held-out', 'accuracy']}")
    print(f"held-out lenient gain rft/trl (points): {gains['held-out', 'lenient']}")
    print(f"paraphrased lenient gain rft/trl (points): {gains['paraphrased', 'lenient']}")


if __name__ == "__main__":
    main()
