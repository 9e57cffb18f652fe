"""A job with a wall-clock budget (`max_minutes`) far too small for its steps ends cleanly
after one step -- evaluated, checkpointed, its adapter written -- and `--resume` continues it.

Deterministic without sleeps: the budget (0.06 s) is spent before the first step ends (starting
Ray and the actors alone takes seconds), and a job trains at least one step, so it stops after
exactly one on any machine, however slow or loaded."""

from __future__ import annotations

import json

import pytest

from services.jobs.registry import SUCCEEDED, open_registry
from services.orchestrator.rollout_stream import ScoredRolloutStream
from tests.integration.test_e2e import read_jsonl, rft, write_job

pytestmark = pytest.mark.slow

STEPS_PLANNED = 1000


def test_budget_stops_after_the_step_in_progress_and_resume_continues(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    run_dir = tmp_path / "runs" / "e2e"
    # Evaluations and checkpoints only every 100 steps: those at step 1 are the budget's finish.
    out = rft(
        "run",
        str(config),
        *("-o", f"steps={STEPS_PLANNED}", "-o", "max_minutes=0.001"),
        *("-o", "eval.every_steps=100", "-o", "checkpoint.every_steps=100"),
    )
    assert (
        f"stopped for the time budget (max_minutes=0.001) after 1 of {STEPS_PLANNED} steps; "
        f"rft run --resume {run_dir} continues"
    ) in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["stopped"], summary["steps"]) == ("max_minutes", 1)
    assert summary["steps_planned"] == STEPS_PLANNED
    assert summary["heldout_final"]["count"] == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert "heldout_accuracy" in records[1]  # the final evaluation, of the final weights
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_1"]
    state = json.loads((run_dir / "checkpoints" / "step_1" / "driver_state.json").read_text())
    # Step 2's prompts went out ahead (max_staleness 1) but were not trained: taken (in the
    # cursor) and pending, so a resume generates them again for step 2.
    assert (state["step"], state["data_cursor"], state["samples_trained"]) == (1, 4, 8)
    assert list(state["pending_prompts"]) == ["1"]
    registry = open_registry(tmp_path / "runs")
    assert registry.get("e2e").state == SUCCEEDED
    assert ScoredRolloutStream(registry.redis, "e2e").unacknowledged() == {}  # trained, on disk
    load_adapter(tiny_model_dir, run_dir / "adapter")

    # A budget of its own per invocation: 600 minutes is room for every step left.
    rft("run", "--resume", str(run_dir), "-o", "steps=3", "-o", "max_minutes=600")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["stopped"], summary["steps"], summary["data_cursor"]) == (None, 3, 3 * 2)
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len({s["sample_id"] for s in samples}) == len(samples) == 3 * 2 * 4  # none twice, none lost
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 1] == [2, 3]


def load_adapter(model_dir, adapter_dir) -> None:
    """The adapter is a peft adapter of the base model, trained away from zero."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
