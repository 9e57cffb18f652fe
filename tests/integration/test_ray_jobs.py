"""Jobs on a real Ray cluster through the CLI: a Ray head started here (loopback ports, token auth,
its own temp dir; stopped by its own processes), `rft submit` of a tiny arithmetic job followed
to SUCCEEDED with `rft status`/`rft logs`, and a second job cancelled with `rft cancel` while it runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.jobs.registry import PENDING, STOPPED, SUCCEEDED, open_registry
from tests.ray_head import start_ray_head, wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "arithmetic.yaml"


def tiny_job_overrides(model_dir: Path, steps: int) -> list[str]:
    settings = [
        f"model.path={model_dir}",
        f"steps={steps}",
        "prompts_per_step=2",
        "rollout.engine=hf",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=8",
        "data.heldout_limit=2",
        "reward.num_workers=1",
        "learner.micro_batch_size=4",
        "learner.lora_rank=4",
        "learner.lora_alpha=8",
        "eval.every_steps=1",
        "checkpoint.every_steps=1",
        "metrics.port=0",
    ]
    return [arg for setting in settings for arg in ("-o", setting)]


def job_actor_processes(head) -> list[str]:
    """Command lines (Ray sets them to `ray::<actor>...`) of the head's learner/rollout/reward actors."""
    lines = []
    for process in head.processes():
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            continue
    return [
        line
        for line in lines
        if line.startswith("ray::")
        and any(kind in line for kind in ("Learner", "RolloutWorker", "RewardWorker"))
    ]


@pytest.fixture
def ray_head():
    head = start_ray_head(num_cpus=2)
    yield head
    head.stop()
    assert not head.processes(), "processes of the test's Ray head survived stop()"
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_submit_follow_to_success_and_cancel_another(ray_head, tmp_path, tiny_model_dir):
    def rft(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--address", ray_head.dashboard_url],
            cwd=tmp_path,
            env=ray_head.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"rft {args[0]}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result.stdout

    def ray_state(job_id: str) -> str:
        output = rft("status", job_id)
        state = re.search(rf"^{job_id}\s+ray: (\w+)", output, re.MULTILINE).group(1)
        assert state not in ("FAILED", "STOPPED") or job_id == "tiny-cancel", rft("logs", job_id)[-5000:]
        return state

    # 1. A one-step job, followed to the end.
    # A fresh head's job agent can take minutes to come up on a loaded machine: submit waits for it.
    assert "submitted tiny-ok" in rft(
        "submit",
        str(EXAMPLE),
        "--job-id",
        "tiny-ok",
        "--agent-wait",
        "400",
        *tiny_job_overrides(tiny_model_dir, steps=1),
    )
    wait_for(lambda: ray_state("tiny-ok") == SUCCEEDED, 900, "job tiny-ok SUCCEEDED", interval_s=3)
    logs = rft("logs", "tiny-ok", "--follow")
    assert "held-out accuracy: base" in logs and logs.rstrip().endswith("-- tiny-ok: SUCCEEDED")
    run_dir = tmp_path / "runs" / "tiny-ok"  # run_root is relative to where rft submit ran
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir()

    registry = open_registry(tmp_path / "runs")
    record = registry.get("tiny-ok")
    assert record.state == SUCCEEDED and Path(record.run_dir) == run_dir.resolve()
    assert record.history[0].state == PENDING and record.history[0].source == "submit"
    assert "name: tiny-ok" in record.config_yaml
    assert [c.source for c in record.history] == ["submit", "driver", "driver"]  # PENDING, RUNNING, SUCCEEDED
    assert record.step == 1 and "reward_mean" in record.metrics and "heldout_accuracy" in record.metrics
    detail = rft("status", "tiny-ok")
    assert "registry: SUCCEEDED" in detail and re.search(
        r"step 1\s+policy version \d+\s+reward 0\.\d{3}", detail
    )

    # 2. A long job, cancelled once its actors are up.
    rft("submit", str(EXAMPLE), "--job-id", "tiny-cancel", *tiny_job_overrides(tiny_model_dir, steps=500))
    wait_for(
        lambda: "run dir:" in rft("logs", "tiny-cancel"), 600, "job tiny-cancel's actors up", interval_s=3
    )
    assert "tiny-cancel: STOPPED" in rft("cancel", "tiny-cancel")
    cancelled = registry.get("tiny-cancel")
    # The driver reports it; if Ray's stop timeout kills it first, `rft cancel` copies Ray's state.
    assert cancelled.state == STOPPED and cancelled.history[-1].source in ("driver", "ray"), (
        f"{cancelled.history}\n{rft('logs', 'tiny-cancel')[-6000:]}"
    )
    wait_for(lambda: not job_actor_processes(ray_head), 120, "the cancelled job's actors gone")

    # 3. The list shows both, each with its own state; the first job's record is untouched.
    listing = rft("list")
    assert re.search(r"tiny-ok\s.*SUCCEEDED", listing) and re.search(r"tiny-cancel\s.*STOPPED", listing)
    assert registry.get("tiny-ok").state == SUCCEEDED
