"""Dynamic sampling and the difficulty filter in real jobs (tiny model, real actors): a grader
whose verdict depends on the item makes some prompts always flat, so the prompts every step takes
are known in advance (`Schedule`, the rules alone) -- and a run killed mid-way then resumed must
take exactly those, train every sample of a group with signal once and count every other."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import ray

from learner.group import LearnerFailedError
from services.config import load_config
from services.orchestrator.driver import run_job
from services.orchestrator.setup import prepare_inputs
from tests.integration.test_crash_resume import kill_learner
from tests.integration.test_e2e import read_jsonl, write_job
from tests.integration.test_self_healing import ScriptedControl
from tests.unit.test_selection import Schedule

pytestmark = pytest.mark.slow

KINDS = ["live", "easy", "hard", "live", "easy", "hard", "live", "easy"]  # item i's kind
# easy: every sample solves it; hard: none does; live: rewards differ by the completion's text.
GRADER = """import zlib
def grade(sample, item):
    if item["kind"] != "live":
        return float(item["kind"] == "easy")
    return (zlib.crc32(sample["output_text"].encode()) % 1000) / 1000
"""
SAMPLES = 4


def flat_or_not(inputs):
    kind = {item["id"]: item["kind"] for item in inputs.train_items}
    return lambda prompt_id, sample_index: float(sample_index % 2) if kind[prompt_id] == "live" else 0.0


def run(tmp_path, tiny_model_dir, kinds, overrides, control=None, resume=False):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    items = [
        {"id": f"{kind}{i}", "kind": kind, "messages": [{"role": "user", "content": f"Say {i}."}]}
        for i, kind in enumerate(kinds)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "grader.py").write_text(GRADER)
    cfg = load_config(
        config,
        [
            f"rollout.samples_per_prompt={SAMPLES}",
            "eval.at_start=false",
            "eval.every_steps=100",
            "reward.num_workers=1",
            "data.heldout=null",
            *overrides,
        ],
    )
    inputs = prepare_inputs(cfg)
    try:
        run_job(cfg, inputs, resume=resume, control=control or ScriptedControl(sizes={}))
    finally:
        ray.shutdown()
    return cfg, inputs


def by_step(records: list[dict]) -> dict[int, list[dict]]:
    steps = defaultdict(list)
    for record in records:
        steps[record["step"]].append(record)
    return steps


def test_dynamic_sampling_and_filter_survive_a_crash_and_resume(tmp_path, tiny_model_dir):
    overrides = [
        "steps=5",
        "prompts_per_step=2",
        "algorithm.min_signal_groups=2",
        "algorithm.max_extra_prompts=3",
        "data.difficulty_filter={visits: 1, skip_probability: 0.9}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
    ]
    # Call 3 comes just before step index 2 is collected (and topped up): its rollouts reach the
    # stream, then the learner is gone when they are to be trained.
    with pytest.raises(LearnerFailedError, match="learner rank 0 died"):
        run(
            tmp_path,
            tiny_model_dir,
            KINDS,
            [*overrides, "learner.max_restarts=0"],
            ScriptedControl(sizes={}, actions={3: kill_learner}),
        )
    cfg, inputs = run(tmp_path, tiny_model_dir, KINDS, overrides, resume=True)
    expected = Schedule(cfg, inputs, flat_or_not(inputs)).run(cfg.steps)
    assert expected.steps[2][1] > 0  # the replayed step had extra prompts ...
    assert sum(skipped for s, (*_, skipped) in expected.steps.items() if s > 2) > 0  # ... then skips

    samples = by_step(read_jsonl(cfg.run_dir / "samples.jsonl"))
    metrics = {m["step"]: m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "signal_groups" in m}
    assert sorted(samples) == sorted(metrics) == [1, 2, 3, 4, 5]
    assert [m["rollouts_replayed_count"] > 0 for m in metrics.values()] == [False, False, True, False, False]
    for step, records in samples.items():
        ids, extra, skipped = expected.steps[step - 1]
        groups = defaultdict(list)
        for r in records:
            prompt_id, index = r["sample_id"].split("#")
            groups[prompt_id, int(index) // SAMPLES].append(r)
        assert sorted(prompt_id for prompt_id, _ in groups) == ids, step
        assert len({r["sample_id"] for r in records}) == len(records) == len(ids) * SAMPLES
        signal = 0
        for members in groups.values():
            flat = len({m["reward"] for m in members}) == 1
            signal += not flat
            assert all(m["trained"] != flat for m in members)  # trained once, or a flat group left out
        m = metrics[step]
        assert (m["signal_groups"], m["zero_signal_groups"]) == (signal, len(groups) - signal)
        assert (m["extra_prompts"], m["filter_skipped_prompts"]) == (extra, skipped)
        assert m["samples_trained_count"] == signal * SAMPLES
    final = json.loads((cfg.run_dir / "checkpoints" / "step_5" / "driver_state.json").read_text())
    assert final["data_cursor"] == expected.state.data_cursor
    assert final["flat_streaks"] == expected.state.flat_streaks and final["pending_prompts"] == {}


def test_when_every_prompt_is_flat_the_bound_stops_the_top_up_and_the_job_goes_on(tmp_path, tiny_model_dir):
    cfg, _ = run(
        tmp_path,
        tiny_model_dir,
        ["hard"] * 8,
        ["steps=2", "prompts_per_step=2", "algorithm.min_signal_groups=2", "algorithm.max_extra_prompts=3"],
    )
    metrics = [m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "signal_groups" in m]
    counted = [(m["extra_prompts"], m["signal_groups"], m["zero_signal_groups"]) for m in metrics]
    assert counted == [(3, 0, 5)] * 2
    samples = read_jsonl(cfg.run_dir / "samples.jsonl")
    assert len(samples) == 2 * 5 * SAMPLES and not any(s["trained"] for s in samples)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["policy_version"], summary["data_cursor"]) == (2, 0, 2 * 5)
