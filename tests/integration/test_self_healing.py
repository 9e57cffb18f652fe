"""Rollout workers die and are resized while a job runs; every prompt of every step is still
trained exactly once (proved with sample ids from the run's own samples.jsonl)."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import ray

from services.config import load_config
from services.orchestrator.data import PromptOrder
from services.orchestrator.driver import run_job
from services.orchestrator.setup import prepare_inputs
from tests.integration.test_e2e import read_jsonl, write_job

pytestmark = pytest.mark.slow
STEPS, PROMPTS_PER_STEP, SAMPLES_PER_PROMPT = 5, 2, 4


class ScriptedControl:
    """The job's control input, scripted per call (the driver asks once per step, just before it
    submits that step's generation): how many rollout workers to run, and faults to inject."""

    def __init__(self, sizes: dict[int, int], actions: dict | None = None):
        self.sizes, self.actions = sizes, actions or {}
        self.calls = 0

    def desired_rollout_workers(self) -> int | None:
        call, self.calls = self.calls, self.calls + 1
        if call in self.actions:
            self.actions[call]()
        return self.sizes.get(call)


def actor_pid(name: str) -> int:
    return ray.get(ray.get_actor(name).process_id.remote())


def run(tmp_path, tiny_model_dir, control, overrides=(), resume=False):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    # 6 train items, 2 per step: steps 1-3 are epoch 1, steps 4-5 epoch 2 (the same prompts again).
    cfg = load_config(
        config,
        [
            f"steps={STEPS}",
            f"prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
            "rollout.max_new_tokens=24",
            "algorithm.skip_zero_signal_groups=false",
            "eval.at_start=false",
            "eval.every_steps=100",
            "checkpoint.every_steps=100",
            "reward.num_workers=1",
            *overrides,
        ],
    )
    inputs = prepare_inputs(cfg)
    try:
        run_job(cfg, inputs, resume=resume, control=control)
    finally:
        ray.shutdown()
    return cfg, inputs, read_jsonl(cfg.run_dir / "samples.jsonl"), read_jsonl(cfg.run_dir / "metrics.jsonl")


def assert_trained_exactly_once(cfg, inputs, records):
    order = PromptOrder(len(inputs.train_items), cfg.seed, 0)
    expected = {
        step: sorted(
            f"{inputs.train_items[i]['id']}#{k}"
            for i in order.take(PROMPTS_PER_STEP)
            for k in range(SAMPLES_PER_PROMPT)
        )
        for step in range(1, STEPS + 1)
    }
    trained = defaultdict(list)
    for record in records:
        assert record["trained"], record  # nothing dropped: no stale rollout, no skipped group
        trained[record["step"]].append(record["sample_id"])
    assert {step: sorted(ids) for step, ids in trained.items()} == expected


def test_killed_rollout_worker_is_replaced_and_no_sample_is_lost_or_repeated(tmp_path, tiny_model_dir):
    killed = []

    def kill_rollout_worker():
        # Step 2's prompts are submitted right after this returns, one group to each worker: the
        # dead worker's group is in flight from the driver's view (and so may be the step-1 group
        # it generated but the driver has not taken yet).
        killed.append(actor_pid("e2e-rollout-0"))
        os.kill(killed[0], signal.SIGKILL)

    cfg, inputs, records, metrics = run(
        tmp_path, tiny_model_dir, ScriptedControl(sizes={0: 2}, actions={2: kill_rollout_worker})
    )
    assert killed
    assert_trained_exactly_once(cfg, inputs, records)
    replaced = sum(m.get("rollout_workers_replaced_count", 0) for m in metrics)
    reissued = sum(m.get("requests_reissued_count", 0) for m in metrics)
    assert replaced == 1 and reissued > 0, (replaced, reissued)
    # The replacement (rollout-2) served rollouts after the kill, synced first: trained at a step
    # whose starting version (records' "step" counts completed steps) was at most one ahead.
    late = [r for r in records if r["worker_id"] == "rollout-2"]
    assert late and all((r["step"] - 1) - r["policy_version"] <= cfg.sync.max_staleness for r in late)


def test_rollout_worker_killed_mid_episode_has_its_episodes_run_again(tmp_path, tiny_model_dir):
    """Multi-turn: the killed worker's episodes are re-run from the start on another worker; every
    episode is trained exactly once, whole (all its turns, one policy version)."""
    killed = []

    def kill_rollout_worker():
        killed.append(actor_pid("e2e-rollout-0"))
        os.kill(killed[0], signal.SIGKILL)

    environment = Path(__file__).parent / "environments" / "counting.py"
    overrides = [
        f"rollout.environment={{type: python, path: {environment}, options: {{turns: 2}}}}",
        "rollout.max_episode_tokens=200",
    ]
    cfg, inputs, records, metrics = run(
        tmp_path, tiny_model_dir, ScriptedControl(sizes={0: 2}, actions={2: kill_rollout_worker}), overrides
    )
    assert killed
    assert_trained_exactly_once(cfg, inputs, records)
    assert sum(m.get("requests_reissued_count", 0) for m in metrics) > 0
    for record in records:
        versions = {t["policy_version"] for t in record["turns"] if "policy_version" in t}
        assert len(versions) == 1 and [t["role"] for t in record["turns"]][-3:] == [
            "assistant",
            "user",
            "assistant",
        ]


def scrape_job_targets(targets_dir: Path, job: str) -> dict[str, str]:
    """component-worker -> the text of its /metrics page, for every target the job announces."""
    pages = {}
    for path in sorted(targets_dir.glob(f"{job}-*.json")):
        [group] = json.loads(path.read_text())
        pages[path.stem.removeprefix(f"{job}-")] = (
            urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10).read().decode()
        )
    return pages


def test_scale_one_to_three_to_one_mid_run(tmp_path, tiny_model_dir):
    targets_dir = tmp_path / "runs" / "prometheus-targets"
    scraped = []
    control = ScriptedControl(
        sizes={1: 3, 3: 1}, actions={3: lambda: scraped.append(scrape_job_targets(targets_dir, "e2e"))}
    )
    cfg, inputs, records, metrics = run(tmp_path, tiny_model_dir, control)
    # Every component served its own metrics, labelled job and worker, while the job ran ...
    [pages] = scraped
    assert {"learner", "rollout-0", "rollout-1", "rollout-2", "reward-0"} <= pages.keys(), pages.keys()
    assert re.search(
        r'rft_rollout_generated_tokens_total\{job="e2e",worker="rollout-0"\} [1-9]', pages["rollout-0"]
    )
    assert re.search(r'rft_learner_steps_total\{job="e2e",worker="learner"\} [1-9]', pages["learner"])
    assert re.search(
        r'rft_reward_samples_graded_total\{job="e2e",worker="reward-0"\} [1-9]', pages["reward-0"]
    )
    assert not list(targets_dir.glob("e2e*.json"))  # ... and none is announced after it ended
    assert_trained_exactly_once(cfg, inputs, records)
    workers_per_step = [m["rollout_workers"] for m in metrics if "rollout_workers" in m]
    assert 3 in workers_per_step and workers_per_step[-1] == 1, workers_per_step
    served_by = Counter(r["worker_id"] for r in records)
    assert {"rollout-0", "rollout-1", "rollout-2"} <= served_by.keys(), served_by
    assert sum(m.get("rollout_workers_replaced_count", 0) for m in metrics) == 0
