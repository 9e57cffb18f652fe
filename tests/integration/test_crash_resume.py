"""The learner dies mid-run, then the job is resumed; Redis restarts mid-run. Either way every
sample of every step is trained exactly once and the data cursor ends where an uninterrupted
run's does."""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray

from learner.group import LearnerFailedError
from services.jobs.registry import SUCCEEDED, open_registry
from services.orchestrator.driver import TrainingDivergedError
from tests.integration.test_self_healing import (
    PROMPTS_PER_STEP,
    STEPS,
    ScriptedControl,
    assert_trained_exactly_once,
    run,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow


def kill_learner() -> None:
    """SIGKILL the learner's process (its one rank) and wait until Ray has noticed, so the step
    about to be trained fails for certain."""
    learner = ray.get_actor("e2e-learner-0")
    os.kill(ray.get(learner.process_id.remote()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(learner.process_id.remote())


def test_learner_killed_mid_run_then_resumed_trains_each_sample_once(tmp_path, tiny_model_dir):
    every_step = ["checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    # Call 3 comes after step index 2's rollouts were collected: they are scored and appended to
    # the stream, and then the learner is gone when they are to be trained. No restarts allowed:
    # the job stops (a restart within the job: tests/integration/test_learner_group.py).
    with pytest.raises(LearnerFailedError, match="learner rank 0 died"):
        run(
            tmp_path,
            tiny_model_dir,
            ScriptedControl(sizes={}, actions={3: kill_learner}),
            [*every_step, "learner.max_restarts=0"],
        )
    run_dir = tmp_path / "runs" / "e2e"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]

    cfg, inputs, records, metrics = run(
        tmp_path, tiny_model_dir, ScriptedControl(sizes={}), every_step, resume=True
    )
    assert_trained_exactly_once(cfg, inputs, records)
    # Step 3's scored rollouts came back from the stream rather than being generated again.
    assert [m["step"] for m in metrics if m.get("rollouts_replayed_count")] == [3]
    final = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "driver_state.json").read_text())
    assert final["data_cursor"] == STEPS * PROMPTS_PER_STEP  # where an uninterrupted run ends
    assert final["samples_trained"] == len(records)
    assert open_registry(cfg.run_root).get("e2e").state == SUCCEEDED


def test_redis_restart_mid_run_job_completes(tmp_path, tiny_model_dir):
    server = RedisServer(tmp_path, append_only=True).start()
    try:
        cfg, inputs, records, _ = run(
            tmp_path,
            tiny_model_dir,
            ScriptedControl(sizes={}, actions={2: server.restart}),
            [f"cluster.redis_url={server.url}", "checkpoint.every_steps=2"],
        )
        assert_trained_exactly_once(cfg, inputs, records)
        job = open_registry(cfg.run_root, server.url).get("e2e")
        assert (job.state, job.step) == (SUCCEEDED, STEPS)
        assert len(job.history) >= 3  # PENDING, RUNNING written before the restart survived it (AOF)
    finally:
        server.stop()


def test_repeated_non_finite_steps_stop_the_job_with_a_clear_message(tmp_path, tiny_model_dir):
    # A real divergence: a learning rate of 1e30 turns the adapter's weights huge after
    # one step, and every later forward pass overflows to a non-finite loss.
    with pytest.raises(TrainingDivergedError, match="3 learner steps in a row had a non-finite loss"):
        run(
            tmp_path,
            tiny_model_dir,
            ScriptedControl(sizes={}),
            ["learner.learning_rate=1.0e+30", "learner.max_consecutive_skipped_steps=3", "steps=6"],
        )
    records = [
        json.loads(line) for line in (tmp_path / "runs" / "e2e" / "samples.jsonl").read_text().splitlines()
    ]
    assert any(r["trained"] for r in records) and not all(r["trained"] for r in records)
