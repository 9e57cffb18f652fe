"""The grader sandbox, with real subprocesses and real hostile graders.

Each hostile sample is followed by a good sample in the same batch: a hostile grader must cost
only its own score.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from core.sandbox.namespaces import SandboxUnavailableError
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import PythonGrader
from reward_workers.sandbox import GraderSandbox

GOOD_SAMPLE = {"output_text": "42", "finish_reason": "stop"}
GOOD_ITEM = {"id": "q1", "reward_model": {"ground_truth": "42"}}

# One grader module with many behaviours, chosen by item["attack"]; no attack = a correct grader.
HOSTILE_GRADER = """
import ctypes, os, signal, socket, sys, time

# Module-level code runs in the runner itself: this lets a sample kill or hang its runner.
signal.signal(signal.SIGUSR1, lambda *_: os._exit(7))
signal.signal(signal.SIGUSR2, lambda *_: time.sleep(3600))

def grade(sample, item):
    attack = item.get("attack")
    if attack is None:
        return float(sample["output_text"] == item["reward_model"]["ground_truth"])
    return globals()[attack](item)

def connect(item):
    if "unix_name" in item:
        socket.socket(socket.AF_UNIX).connect("\\0" + item["unix_name"])
    else:
        socket.create_connection((item["host"], item["port"]), timeout=2)
    return 1.0

def sleep_forever(item):
    while True:
        time.sleep(1)

def spin(item):
    while True:
        pass

def read_env(item):
    environments = [str(os.environ)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environments.append(open(f"/proc/{pid}/environ", errors="replace").read())
        except OSError:
            pass
    return 1.0 if any(item["secret"] in env for env in environments) else 0.5

def allocate(item):
    blocks = []
    while True:
        blocks.append(bytearray(64 * 2**20))

def fork_bomb(item):
    while True:
        os.fork()

def count_forks(item):
    for forked in range(item["max_forks"]):
        try:
            if os.fork() == 0:
                signal.pause()
        except OSError:
            return float(forked)
    return float(item["max_forks"])

def count_processes(item):
    return float(sum(name.isdigit() for name in os.listdir("/proc")))

def flood_stdout(item):
    while True:
        sys.stdout.write("x" * 2**20)

def kill_parent(item):
    os.kill(os.getppid(), signal.SIGKILL)
    return 0.25

def signal_runner(item):
    os.kill(os.getppid(), getattr(signal, item["signal"]))
    time.sleep(3600)

def read_file(item):
    try:
        return 1.0 if open(item["path"]).read() else 0.75
    except OSError:
        return 0.5

def write_files(item):
    written = []
    for path in item["paths"]:
        try:
            open(path, "w").write("escaped")
            written.append(path)
        except OSError:
            pass
    open("scratch.txt", "w").write("ok")  # the private working directory is writable
    assert open("scratch.txt").read() == "ok"
    return {"reward": 1.0 if written else 0.5, "hack_flags": written}

def undo_mounts(item):
    libc = ctypes.CDLL(None, use_errno=True)
    unmounted = libc.umount2(b"/tmp", 2) == 0
    remounted = libc.mount(None, b"/", None, 0x20 | 0x1000, None) == 0  # MS_REMOUNT|MS_BIND, rw
    cap_eff = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")]
    return {"reward": 1.0 if unmounted or remounted else 0.5, "hack_flags": cap_eff}

def list_dev(item):
    return {"reward": 1.0, "hack_flags": sorted(os.listdir("/dev"))}
"""


def write_grader(directory: Path, code: str, name: str = "grader.py") -> PythonGrader:
    path = directory / name
    path.write_text(textwrap.dedent(code))
    return PythonGrader(source=str(path))


def make_limits(grader: PythonGrader, **overrides) -> RewardConfig:
    # A generous wall-clock limit: shared test machines can be very busy.
    settings = dict(timeout_s=20.0, cpu_s=1, memory_mb=256, max_output_bytes=65536)
    return RewardConfig(grader=grader, **{**settings, **overrides})


@pytest.fixture(scope="module")
def hostile_sandbox(tmp_path_factory):
    # A secret in this process's environment, set before the runner starts.
    os.environ["RFT_TEST_SECRET"] = "s3cret-" + uuid.uuid4().hex
    grader = write_grader(tmp_path_factory.mktemp("hostile"), HOSTILE_GRADER)
    with GraderSandbox(grader, make_limits(grader)) as sandbox:
        yield sandbox
    del os.environ["RFT_TEST_SECRET"]


def grade_then_good(sandbox: GraderSandbox, item: dict):
    """Grade one hostile sample then a good one; the good one must be unaffected."""
    hostile, good = sandbox.grade([GOOD_SAMPLE, GOOD_SAMPLE], [{**GOOD_ITEM, **item}, GOOD_ITEM])
    assert (good.reward, good.error) == (1.0, None), f"a hostile sample spoiled the next one: {good}"
    return hostile


# -- ordinary graders ------------------------------------------------------------------------


def test_correct_grader_and_dict_results(tmp_path):
    grader = write_grader(
        tmp_path,
        """
        def grade(sample, item):
            right = sample["output_text"].strip() == item["reward_model"]["ground_truth"]
            if item.get("as_dict"):
                return {"reward": 0.5 + 0.5 * right, "components": {"format": 0.5, "correct": float(right)},
                        "hack_flags": [] if right else ["wrong"]}
            return float(right)
    """,
    )
    samples = [
        GOOD_SAMPLE,
        {"output_text": "41", "finish_reason": "length"},
        GOOD_SAMPLE,
        {"output_text": "7", "finish_reason": "stop"},
    ]
    items = [GOOD_ITEM, GOOD_ITEM, {**GOOD_ITEM, "as_dict": True}, {**GOOD_ITEM, "as_dict": True}]
    with GraderSandbox(grader, make_limits(grader)) as sandbox:
        results = sandbox.grade(samples, items)
        assert "no network (empty network namespace)" in sandbox.protections
    assert [(r.reward, r.error) for r in results] == [(1.0, None), (0.0, None), (1.0, None), (0.5, None)]
    assert results[2].components == {"format": 0.5, "correct": 1.0}
    assert results[3].hack_flags == ["wrong"] and results[2].hack_flags == []


GARBAGE_RESULTS = {  # what grade() returns -> what the reason must mention
    "None": "NoneType",
    "'abc'": "str",
    "float('nan')": "nan",
    "float('inf')": "inf",
    "True": "bool",
    "{'components': {'a': 1.0}}": "'reward'",
    "{'reward': 1.0, 'extra': 2}": "'extra'",
    "{'reward': 1.0, 'components': {'a': 'x'}}": "component 'a'",
    "{'reward': 1.0, 'hack_flags': 'x'}": "hack_flags",
    "object()": "not a number",
}


def test_garbage_results_score_zero_with_a_reason(tmp_path):
    grader = write_grader(
        tmp_path,
        """
        def grade(sample, item):
            return eval(item.get("returned", "1.0"))
    """,
    )
    with GraderSandbox(grader, make_limits(grader)) as sandbox:
        for returned, reason in GARBAGE_RESULTS.items():
            garbage = grade_then_good(sandbox, {"returned": returned})
            assert garbage.reward == 0.0 and garbage.error and reason in garbage.error, (returned, garbage)


@pytest.mark.parametrize(
    "code, reason",
    [
        ("def grade(sample, item:\n    return 1.0\n", "SyntaxError"),
        ("def score(sample, item):\n    return 1.0\n", "does not define a function grade"),
        ("raise RuntimeError('broken at import')\n", "broken at import"),
    ],
)
def test_grader_that_fails_to_load_scores_every_sample_zero(tmp_path, code, reason):
    grader = write_grader(tmp_path, code, name="broken_grader.py")
    with GraderSandbox(grader, make_limits(grader)) as sandbox:
        results = sandbox.grade([GOOD_SAMPLE] * 3, [GOOD_ITEM] * 3)
    for result in results:
        assert result.reward == 0.0 and reason in result.error and grader.source in result.error


def test_missing_grader_file_names_the_file(tmp_path):
    grader = PythonGrader(source=str(tmp_path / "nowhere.py"))
    with GraderSandbox(grader, make_limits(grader)) as sandbox:
        (result,) = sandbox.grade([GOOD_SAMPLE], [GOOD_ITEM])
    assert result.reward == 0.0 and "nowhere.py" in result.error


# -- hostile graders -------------------------------------------------------------------------


def test_no_network(hostile_sandbox):
    listener = socket.create_server(("127.0.0.1", 0))
    unix_name = "rft-test-" + uuid.uuid4().hex
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind("\0" + unix_name)
    unix_listener.listen()
    with listener, unix_listener:
        for item in (
            {"attack": "connect", "host": "1.1.1.1", "port": 53},
            {"attack": "connect", "host": "127.0.0.1", "port": listener.getsockname()[1]},
            {"attack": "connect", "unix_name": unix_name},
        ):
            result = grade_then_good(hostile_sandbox, item)
            assert result.reward == 0.0 and "grader raised" in result.error, result
            assert "Network is unreachable" in result.error or "Connection refused" in result.error
        for server in (listener, unix_listener):
            server.setblocking(False)
            with pytest.raises(BlockingIOError):  # nobody connected
                server.accept()


def test_wall_clock_limit(tmp_path):
    grader = write_grader(tmp_path, HOSTILE_GRADER)
    with GraderSandbox(grader, make_limits(grader, timeout_s=2.0)) as sandbox:
        result = grade_then_good(sandbox, {"attack": "sleep_forever"})
    assert result.reward == 0.0 and "timed out after 2 s (wall-clock limit)" in result.error


def test_cpu_limit(hostile_sandbox):
    result = grade_then_good(hostile_sandbox, {"attack": "spin"})
    assert result.reward == 0.0 and "CPU-time limit of 1 s" in result.error


def test_parent_environment_is_invisible(hostile_sandbox):
    secret = os.environ["RFT_TEST_SECRET"]
    inherited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['RFT_TEST_SECRET'])"],
        capture_output=True,
        text=True,
    )
    assert inherited.stdout.strip() == secret  # an ordinary child process would see it
    result = grade_then_good(hostile_sandbox, {"attack": "read_env", "secret": secret})
    assert (result.reward, result.error) == (0.5, None)


def test_memory_limit(hostile_sandbox):
    result = grade_then_good(hostile_sandbox, {"attack": "allocate"})
    assert result.reward == 0.0 and "memory limit (256 MB)" in result.error


def test_fork_bomb_is_contained(hostile_sandbox, tmp_path):
    grader = write_grader(tmp_path, HOSTILE_GRADER)
    with GraderSandbox(grader, make_limits(grader, timeout_s=5.0)) as sandbox:
        result = grade_then_good(sandbox, {"attack": "fork_bomb"})
    assert result.reward == 0.0
    assert "Resource temporarily unavailable" in result.error or "timed out after 5 s" in result.error
    # The number of processes a sample can make is capped, and none outlive their sample.
    forks = grade_then_good(hostile_sandbox, {"attack": "count_forks", "max_forks": 1000})
    assert forks.error is None and 0 < forks.reward < 100
    survivors = grade_then_good(hostile_sandbox, {"attack": "count_processes"})
    assert survivors.reward == 2.0  # the runner and the grading child itself


def test_output_flood_is_cut_off(hostile_sandbox):
    result = grade_then_good(hostile_sandbox, {"attack": "flood_stdout"})
    assert result.reward == 0.0 and "more than 65536 bytes of output" in result.error


def test_killing_its_parent_does_nothing(hostile_sandbox):
    # The runner is the init process of the sandbox's pid namespace: the kernel drops SIGKILL
    # sent to it from inside, so the grader carries on and returns.
    result = grade_then_good(hostile_sandbox, {"attack": "kill_parent"})
    assert (result.reward, result.error) == (0.25, None)


def test_runner_death_costs_only_the_sample_in_flight(hostile_sandbox):
    # The grader module installed a SIGUSR1 handler in the runner that exits it.
    result = grade_then_good(hostile_sandbox, {"attack": "signal_runner", "signal": "SIGUSR1"})
    assert result.reward == 0.0 and "sandbox runner died (exit status 7)" in result.error


def test_hung_runner_is_replaced(tmp_path):
    grader = write_grader(tmp_path, HOSTILE_GRADER)
    with GraderSandbox(grader, make_limits(grader, timeout_s=1.0)) as sandbox:
        result = grade_then_good(sandbox, {"attack": "signal_runner", "signal": "SIGUSR2"})
    assert result.reward == 0.0 and "sandbox runner did not answer within 6 s" in result.error


def test_filesystem_outside_the_sandbox_is_hidden_or_read_only(hostile_sandbox, tmp_path):
    secret_file = tmp_path / "secret.txt"  # under the host's /tmp, which the sandbox hides
    secret_file.write_text("secret")
    assert grade_then_good(hostile_sandbox, {"attack": "read_file", "path": str(secret_file)}).reward == 0.5

    targets = [
        tmp_path / "escaped.txt",
        Path("/var/tmp") / f"rft-escape-{uuid.uuid4().hex}",
        Path("/") / f"rft-escape-{uuid.uuid4().hex}",
    ]
    try:
        item = {"attack": "write_files", "paths": [str(p) for p in targets]}
        result = grade_then_good(hostile_sandbox, item)
        assert (result.reward, result.error, result.hack_flags) == (0.5, None, [])
        assert not any(p.exists() for p in targets)
    finally:
        for p in targets:
            p.unlink(missing_ok=True)


def test_grader_cannot_undo_the_sandbox(hostile_sandbox):
    result = grade_then_good(hostile_sandbox, {"attack": "undo_mounts"})
    assert (result.reward, result.error) == (0.5, None)
    assert result.hack_flags == ["0000000000000000"]  # no effective capabilities
    devices = grade_then_good(hostile_sandbox, {"attack": "list_dev"})
    assert devices.hack_flags == sorted(
        ["fd", "full", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero"]
    )


# -- without namespaces ----------------------------------------------------------------------


def test_refuses_to_run_without_namespaces(no_unshare, tmp_path):
    grader = write_grader(tmp_path, HOSTILE_GRADER)
    with pytest.raises(SandboxUnavailableError, match="allow_weak_isolation"):
        GraderSandbox(grader, make_limits(grader))


def test_weak_isolation_when_allowed(no_unshare, tmp_path, caplog):
    grader = write_grader(tmp_path, HOSTILE_GRADER)
    with caplog.at_level(logging.WARNING, logger="core.sandbox.runner_process"):
        sandbox = GraderSandbox(grader, make_limits(grader, allow_weak_isolation=True))
    with sandbox:
        assert "isolation is WEAKER" in caplog.text and sandbox.protections == []
        # Without a pid namespace the runner is the grader's plain parent: killing it works, and
        # costs only this sample.
        result = grade_then_good(sandbox, {"attack": "kill_parent"})
        assert result.reward == 0.0 and "sandbox runner died (killed by SIGKILL)" in result.error
        assert grade_then_good(sandbox, {"attack": "spin"}).error.startswith("exceeded the CPU-time limit")
