"""The quiet console: what reaches the terminal, what goes to an actor's log file, and the step
line that never wraps."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from core.logs import LOG_DIR_ENV, TerminalFilter
from services.orchestrator.progress import StepProgress

# What an actor does: redirect first, then print and log as vLLM, DeepSpeed and rft code do.
ACTOR = textwrap.dedent("""
    import logging, os
    from core.logs import log_to_file
    print(log_to_file("probe"))
    os.write(2, b"C-level stderr\\n")
    os.system("echo from a child process")
    logging.getLogger("vllm").info("vllm info")
    logging.getLogger("vllm").warning("vllm warning")
    logging.getLogger("DeepSpeed").error("a library's error")
    logging.getLogger("learner.group").info("project info")
    logging.getLogger("learner.group").warning("project warning")
""")


def run_actor(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ACTOR], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_actor_output_goes_to_its_log_file_and_only_warnings_and_errors_to_the_terminal(tmp_path):
    result = run_actor({LOG_DIR_ENV: str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    terminal = result.stderr.splitlines()
    assert [line.split(" ", 2)[2] for line in terminal] == [
        "DeepSpeed ERROR a library's error",
        "learner.group WARNING project warning",
    ]
    log = (tmp_path / "logs" / "probe.log").read_text()
    for line in [
        str(tmp_path / "logs" / "probe.log"),
        "C-level stderr",
        "from a child process",
        "vllm INFO vllm info",
        "vllm WARNING vllm warning",
        "DeepSpeed ERROR a library's error",
        "learner.group INFO project info",
        "learner.group WARNING project warning",
    ]:
        assert line in log
    assert log.startswith("---- probe, pid ")


def test_without_the_log_dir_the_output_stays_where_it_was(tmp_path):
    result = run_actor({LOG_DIR_ENV: ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["None", "from a child process"]
    assert "C-level stderr" in result.stderr and "project warning" in result.stderr


def test_terminal_filter_keeps_project_warnings_and_any_error():
    def shown(name: str, level: int) -> bool:
        return TerminalFilter().filter(logging.LogRecord(name, level, __file__, 1, "m", None, None))

    assert shown("rft.driver", logging.WARNING) and shown("rollout_workers.worker", logging.WARNING)
    assert shown("vllm", logging.ERROR) and shown("DeepSpeed", logging.CRITICAL)
    assert not shown("vllm", logging.WARNING) and not shown("transformers.modeling_utils", logging.WARNING)
    assert not shown("learner.group", logging.INFO)


def test_a_step_line_is_one_line_on_a_narrow_console(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # rich would cut at 40 columns
    values = {
        "step": 3,
        "reward_mean": 0.5,
        "heldout_accuracy": 0.25,
        "policy_version": 3,
        "rollout_tokens_per_second": 1234,
        "learner_step_seconds": 12.5,
        "zero_signal_groups": 1,
    }
    with StepProgress(total_steps=10, completed=2) as progress:
        progress.update(values)
    assert capsys.readouterr().out.splitlines() == [
        "step 3: reward 0.500  held-out 0.250  v 3  tok/s 1234  learn s 12.5  flat groups 1"
    ]
