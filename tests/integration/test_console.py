"""What `rft run` prints, on real jobs with their output in a file (not a terminal) and a
60-column console: one complete line per step, no INFO lines of vLLM, Ray, DeepSpeed or
transformers (they are in runs/<job>/logs/); `--verbose` brings them back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_e2e import write_job

pytestmark = pytest.mark.slow

# Lines the libraries print, as they print them (seen in a run's output before the quiet console).
LIBRARY_LINES = re.compile(
    r"\bINFO\b"  # Ray's "INFO worker.py:2038 -- Started a local Ray instance.", the driver's own
    r"|(INFO|WARNING) \d\d-\d\d [\d:]+ \["  # vLLM's "INFO 12-01 18:37:52 [core.py:133] ..."
    r"|Loading weights|Loading safetensors"  # transformers' and vLLM's progress bars
    r"|DeepSpeed"  # "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    r"|\((Learner|RolloutWorker|RewardWorker) pid=\d+\)"  # anything Ray forwarded from an actor
)


def rft_to_file(output: Path, *args: str) -> str:
    with output.open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            env={**os.environ, "COLUMNS": "60"},  # rich would wrap a step line at 60 columns
        )
    text = output.read_text()
    assert result.returncode == 0, text[-5000:]
    return text


def check_quiet(text: str, steps: int) -> None:
    lines = text.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+): ", line).group(1)) for line in step_lines] == list(range(1, steps + 1))
    assert all(re.search(r"  flat groups \d+$", line) for line in step_lines)  # the last field on it
    assert [line for line in lines if LIBRARY_LINES.search(line)] == []


def test_quiet_console_one_line_per_step_and_the_rest_in_log_files(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    text = rft_to_file(tmp_path / "console.txt", "run", str(config))
    check_quiet(text, steps=2)
    logs = tmp_path / "runs" / "e2e" / "logs"
    assert f"logs: {logs}/" in text
    assert sorted(p.name for p in logs.iterdir()) == [
        "driver.log",
        "learner-0.log",
        "reward-0.log",
        "rollout-0.log",
    ]
    assert "learner.group INFO learner group up" in (logs / "driver.log").read_text()
    for actor in ("learner-0", "rollout-0"):
        log = (logs / f"{actor}.log").read_text()
        assert log.startswith(f"---- {actor}, pid ") and "Loading weights" in log


def test_verbose_prints_the_libraries_lines_here(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "hf", max_staleness=1)
    text = rft_to_file(tmp_path / "console.txt", "run", str(config), "--verbose", "-o", "steps=1")
    assert "Started a local Ray instance" in text and "learner.group INFO learner group up" in text
    assert re.search(r"\(Learner pid=\d+\)", text) and "Loading weights" in text  # (tqdm puts a \r between)
    assert not (tmp_path / "runs" / "e2e" / "logs").exists()


@pytest.mark.vllm
def test_vllm_lines_go_to_the_rollout_workers_log(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, "vllm", max_staleness=1)
    text = rft_to_file(tmp_path / "console.txt", "run", str(config), "-o", "steps=1")
    check_quiet(text, steps=1)
    log = (tmp_path / "runs" / "e2e" / "logs" / "rollout-0.log").read_text()
    assert re.search(r"INFO \d\d-\d\d [\d:]+ \[core\.py:\d+\] Initializing a V1 LLM engine", log)
