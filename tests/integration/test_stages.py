"""A two-stage job through the CLI on the tiny model: an sft stage, then grpo on the weights it
left, stopped by its wall-clock budget after each step and resumed -- the last time inside the
second stage, which it goes on with from the same step."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_e2e import read_jsonl, rft, write_job

pytestmark = pytest.mark.slow

DEMONSTRATIONS = [
    {
        "id": f"demo{i}",
        "messages": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}\nAnswer: {2 * i}"},
        ],
    }
    for i in range(6)
]


def test_an_sft_then_grpo_job_resumes_inside_its_second_stage(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    demonstrations = tmp_path / "demos.jsonl"
    demonstrations.write_text("".join(json.dumps(row) + "\n" for row in DEMONSTRATIONS))
    stages = f"[{{kind: sft, steps: 1, data: {demonstrations}, batch_size: 4}}, {{kind: grpo, steps: 2}}]"
    run_dir = tmp_path / "runs" / "e2e"
    budget = ("-o", "max_minutes=0.001")  # every invocation trains one step, then stops
    first = rft("run", str(config), "-o", f"stages={stages}", "-o", "steps=3", *budget)
    assert "stage 1 (sft): steps 1-1, from step 1" in first.stdout
    second = rft("run", "--resume", str(run_dir), *budget)
    assert "stage 2 (grpo): steps 2-3, from step 2" in second.stdout
    last = rft("run", "--resume", str(run_dir), "-o", "max_minutes=null")
    assert "stage 2 (grpo): steps 2-3, from step 3" in last.stdout  # resumed inside stage 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["policy_version"], summary["stopped"]) == (3, 3, None)
    steps = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0 and "loss" in r}
    assert [steps[s]["stage"] for s in (1, 2, 3)] == [1, 2, 2]
    # The sft step trained the demonstrations (the NLL of their assistant tokens), no rollouts.
    assert steps[1]["samples_trained_count"] == 4 and steps[1]["loss"] > 0 and "reward_mean" not in steps[1]
    assert all("reward_mean" in steps[s] for s in (2, 3))
    samples = read_jsonl(run_dir / "samples.jsonl")  # rollouts only: the grpo stage's
    assert {s["step"] for s in samples} == {2, 3}
    assert len({s["sample_id"] for s in samples}) == len(samples) == 2 * 2 * 4  # none twice, none lost
    # The grpo stage generated on the weights the sft stage left (version 1 and after).
    assert min(s["policy_version"] for s in samples) >= 1


def test_rejection_sft_then_online_and_offline_dpo_resume_inside_the_offline_stage(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"id": f"q{i}", "prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": " 0"} for i in [1, 2, 3]
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stages = (
        "[{kind: rejection_sft, steps: 1, min_reward: 0.5}, {kind: dpo, steps: 1, online: true}, "
        f"{{kind: dpo, steps: 2, data: {pairs}, batch_size: 2, learning_rate: 0.001}}]"
    )
    run_dir = tmp_path / "runs" / "e2e"
    budget = ("-o", "max_minutes=0.001")  # every invocation trains one step, then stops
    rft("run", str(config), "-o", f"stages={stages}", "-o", "steps=4", *budget)
    rft("run", "--resume", str(run_dir), *budget)
    third = rft("run", "--resume", str(run_dir), *budget)
    assert "stage 3 (dpo): steps 3-4, from step 3" in third.stdout
    reference_file = run_dir / "stages" / "3-dpo-reference.json"
    reference = json.loads(reference_file.read_text())  # taken at the stage's start: 3 pairs x 2
    assert sorted(reference) == sorted(f"q{i}/{side}" for i in range(1, 4) for side in ("chosen", "rejected"))
    last = rft("run", "--resume", str(run_dir), "-o", "max_minutes=null")
    assert "stage 3 (dpo): steps 3-4, from step 4" in last.stdout  # resumed inside stage 3
    assert json.loads(reference_file.read_text()) == reference  # read back, not taken again

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["stopped"]) == (4, None)
    steps = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0 and "stage" in r}
    assert [steps[s]["stage"] for s in (1, 2, 3, 4)] == [1, 2, 3, 3]
    samples = {s["sample_id"]: s for s in read_jsonl(run_dir / "samples.jsonl")}
    # Rejection: the step's sft data were exactly its rollouts with reward >= 0.5.
    passed = [s for s in samples.values() if s["step"] == 1 and s["reward"] >= 0.5]
    assert steps[1]["rejection_pass_rate"] == len(passed) / 8
    if passed:
        assert steps[1]["samples_trained_count"] == len(passed) and steps[1]["loss"] > 0
    # Online dpo: one pair per group with a reward margin, trained against the step's start.
    assert steps[2]["dpo_pairs"] <= 2 and "reward_mean" in steps[2]
    if steps[2]["dpo_pairs"]:
        assert steps[2]["samples_trained_count"] == 2 * steps[2]["dpo_pairs"]
        assert steps[2]["loss"] == pytest.approx(0.6931, abs=1e-3)  # margin 0 against the step's start
    # Offline dpo: 2 pairs a step, no rollouts; the first step's margin is 0 (its own reference).
    for s in (3, 4):
        assert steps[s]["samples_trained_count"] == 4 and "reward_mean" not in steps[s]
    assert steps[3]["dpo_reward_margin_mean"] == pytest.approx(0, abs=1e-4)
    assert {s["step"] for s in samples.values()} == {1, 2}  # the offline stage generated nothing
