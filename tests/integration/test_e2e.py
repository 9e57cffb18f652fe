"""The whole loop through the CLI: a tiny random model, real Ray actors, real DeepSpeed,
sandboxed grader, weight sync, checkpoints, metrics, resume."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from weight_sync.adapter import AdapterWeights

pytestmark = pytest.mark.slow

# Random text must still give rewards that differ within a group, or nothing would train.
GRADER = "def grade(sample, item):\n    return (sum(map(ord, sample['output_text'])) % 10) / 10\n"


def write_job(tmp_path: Path, model_dir: Path, engine: str, max_staleness: int) -> Path:
    items = [
        {
            "id": f"p{i}",
            "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "reward_model": {"ground_truth": str(2 * i)},
        }
        for i in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items[:6]))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items[6:]))
    (tmp_path / "grader.py").write_text(GRADER)
    config = tmp_path / "job.yaml"
    config.write_text(f"""
name: e2e
steps: 2
prompts_per_step: 2
run_root: {tmp_path / "runs"}
model: {{path: {model_dir}}}
data: {{train: train.jsonl, heldout: heldout.jsonl}}
rollout: {{engine: {engine}, samples_per_prompt: 4, max_new_tokens: 8, temperature: 1.0}}
reward: {{grader: {{source: grader.py}}, num_workers: 1}}
learner: {{micro_batch_size: 4, lora_rank: 4, lora_alpha: 8}}
sync: {{max_staleness: {max_staleness}}}
eval: {{every_steps: 1}}
checkpoint: {{every_steps: 1, keep_last: 2}}
metrics: {{port: 0}}
cluster: {{num_cpus: 2}}
""")
    return config


def rft(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run(run_dir: Path, steps: int) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["policy_version"] == steps
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert r["samples_trained_count"] > 0 and 0 < r["is_weight_mean"] <= 2.0
        assert "heldout_accuracy" in r and "mismatch_kl" in r
    adapter = AdapterWeights.load_pretrained(run_dir / "adapter")
    adapter.verify()
    assert any(t.abs().sum() > 0 for name, t in adapter.tensors.items() if "lora_B" in name)
    return records


def test_two_steps_then_resume(tmp_path, tiny_model_dir):
    engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    config = write_job(tmp_path, tiny_model_dir, engine, max_staleness=1)
    out = rft("run", str(config))
    assert "held-out accuracy: base" in out.stdout
    run_dir = tmp_path / "runs" / "e2e"
    records = check_run(run_dir, steps=2)
    assert max(r["staleness_max"] for r in records) <= 1
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len({s["sample_id"] for s in samples}) == len(samples) == 2 * 2 * 4  # none twice, none lost
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step_1", "step_2"}

    rft("run", "--resume", str(run_dir), "-o", "steps=3")
    check_run(run_dir, steps=3)
    state = json.loads((run_dir / "checkpoints" / "step_3" / "driver_state.json").read_text())
    assert state["data_cursor"] == 3 * 2 and state["policy_version"] == 3
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step_2", "step_3"}  # keep_last


def test_synchronous_on_policy_with_hf_engine_and_a_second_heldout_set(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=0)
    reworded = {"id": "r6", "prompt": "Add 6 to itself.", "reward_model": {"ground_truth": "12"}}
    (tmp_path / "reworded.jsonl").write_text(json.dumps(reworded) + "\n")
    out = rft("run", str(config), "-o", f"eval.extra_heldout={{reworded: {tmp_path / 'reworded.jsonl'}}}")
    run_dir = tmp_path / "runs" / "e2e"
    records = check_run(run_dir, steps=2)
    assert all(r["staleness_max"] == 0 for r in records)
    # The second set: evaluated on the base model and on the final weights, side by side.
    reworded_summary = json.loads((run_dir / "summary.json").read_text())["heldout_sets"]["reworded"]
    assert reworded_summary["base"]["count"] == reworded_summary["final"]["count"] == 1
    evaluated_at = [
        r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "heldout_reworded_accuracy" in r
    ]
    assert evaluated_at == [0, 2]
    assert "held-out reworded accuracy: base" in out.stdout


def test_existing_run_needs_resume(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=0)
    (tmp_path / "runs" / "e2e" / "checkpoints").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "run", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--resume" in result.stderr
