"""A distill-then-grpo job through the CLI on the tiny model: the teacher is the job's own model
with a system prompt and few-shot examples the student never sees (context distillation), in an
actor of its own. Stopped by its wall-clock budget after the first step and resumed inside the
distill stage, then on into grpo."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_e2e import read_jsonl, rft, write_job

pytestmark = pytest.mark.slow

FEW_SHOT = [
    {
        "messages": [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "Answer: 2"},
        ]
    },
]


def test_a_distill_then_grpo_job_resumes_inside_its_distill_stage(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    few_shot = tmp_path / "few.jsonl"
    few_shot.write_text("".join(json.dumps(row) + "\n" for row in FEW_SHOT))
    teacher = f"{{system_prompt: Reply with the sum only., few_shot: {few_shot}}}"
    stages = f"[{{kind: distill, steps: 2, teacher: {teacher}}}, {{kind: grpo, steps: 1}}]"
    run_dir = tmp_path / "runs" / "e2e"
    first = rft("run", str(config), "-o", f"stages={stages}", "-o", "steps=3", "-o", "max_minutes=0.001")
    assert "stage 1 (distill): steps 1-2, from step 1" in first.stdout
    last = rft("run", "--resume", str(run_dir), "-o", "max_minutes=null")
    assert "stage 1 (distill): steps 1-2, from step 2" in last.stdout  # resumed inside the distill stage
    assert "stage 2 (grpo): steps 3-3, from step 3" in last.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["policy_version"], summary["stopped"]) == (3, 3, None)
    steps = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0 and "loss" in r}
    assert [steps[s]["stage"] for s in (1, 2, 3)] == [1, 1, 2]
    for s in (1, 2):  # every rollout trains: 2 prompts x 4 samples, flat groups too
        assert math.isfinite(steps[s]["distill_reverse_kl"]) and steps[s]["distill_reverse_kl"] != 0
        assert steps[s]["samples_trained_count"] == 8 and "reward_mean" in steps[s]
    assert "distill_reverse_kl" not in steps[3]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2, 3}
    assert len({s["sample_id"] for s in samples}) == len(samples) == 3 * 2 * 4  # none twice, none lost
    assert (run_dir / "logs" / "teacher-0.log").is_file()  # the teacher ran in an actor of its own
