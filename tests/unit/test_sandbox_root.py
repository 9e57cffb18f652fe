"""What a grader can see: the sandbox's minimal root, its unprivileged uid, and the redaction of
secrets from what graders return (core/sandbox/root.py, privileges.py, redaction.py), with real
sandboxes, hostile graders and hostile code_tests submissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from core.sandbox.namespaces import namespace_problem
from core.sandbox.redaction import REDACTED, known_secrets, url_password
from core.sandbox.root import package_location, read_only_paths
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import CodeTestsGrader, PythonGrader
from reward_workers.pool import RewardWorker
from reward_workers.sandbox import GRADER_FACTORY, GraderSandbox, grader_mounts, runner_spec
from rollout_workers.interface import Rollout

pytestmark = pytest.mark.skipif(namespace_problem() is not None, reason="no namespaces for the sandbox")

PROBING_GRADER = """
import os

def _attempt(path):
    try:
        if os.path.isdir(path):
            return "listed " + ",".join(sorted(os.listdir(path)))
        with open(path, "rb") as f:
            return "read " + f.read().decode(errors="replace")
    except OSError as e:
        return type(e).__name__

def grade(sample, item):
    seen = {path: _attempt(path) for path in item["paths"] + item["listings"]}
    obtained = [path for path in item["paths"] if not seen[path].endswith("Error")]
    return {"reward": 0.0 if obtained else 1.0, "diagnostics": [json.dumps(seen)]}

import json
"""


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A service HOME with a Ray token and a cache, a run root with two jobs, a secret env var."""
    token = "ray-token-" + uuid.uuid4().hex
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    (home / ".cache" / "rft").mkdir(parents=True)
    (home / ".cache" / "rft" / "x").write_text("cached " + token)
    runs = tmp_path / "runs"
    for job in ("job-a", "job-b"):
        (runs / job).mkdir(parents=True)
        (runs / job / "samples.jsonl").write_text(json.dumps({"text": f"{job} {token}"}) + "\n")
    env_secret = "env-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RFT_TEST_TOKEN", env_secret)
    paths = [
        str(home / ".ray" / "auth_token"),
        str(home / ".cache"),
        str(home / ".cache" / "rft" / "x"),
        str(runs / "job-a"),
        str(runs / "job-b" / "samples.jsonl"),
        os.path.expanduser("~root/.ray/auth_token"),
        os.path.expanduser("~root/.cache"),
        "/etc/shadow",
        "/home",
        "/var",
        "/run",
    ]
    return {"token": token, "env_secret": env_secret, "home": home, "runs": runs, "paths": paths}


def limits(grader, **overrides) -> RewardConfig:
    settings = dict(timeout_s=30.0, cpu_s=5, memory_mb=512, max_output_bytes=65536)
    return RewardConfig(grader=grader, **{**settings, **overrides})


def python_grader(directory: Path, code: str) -> PythonGrader:
    path = directory / "grader.py"
    path.write_text(textwrap.dedent(code))
    return PythonGrader(source=str(path))


def test_a_hostile_grader_sees_none_of_the_host(planted, tmp_path):
    grader = python_grader(tmp_path, PROBING_GRADER)
    item = {"paths": planted["paths"], "listings": ["/", "/etc", "/tmp", "/dev"]}
    with GraderSandbox(grader, limits(grader)) as sandbox:
        [result] = sandbox.grade([{"output_text": ""}], [item])
        assert any(p.startswith("uid 65534") for p in sandbox.protections), sandbox.protections
    seen = json.loads(result.diagnostics[0])
    for path in planted["paths"]:
        assert seen[path] in ("FileNotFoundError", "PermissionError"), (path, seen[path])
    top = set(seen["/"].removeprefix("listed ").split(","))
    mounts = [package_location(GRADER_FACTORY)[0], *grader_mounts(runner_spec(grader))]
    assert top <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "tmp", "dev", "proc"} | {
        Path(p).parts[1] for p in read_only_paths(mounts)
    }
    assert {"home", "var", "run", "opt", "boot"}.isdisjoint(top)
    assert seen["/etc"] == "listed group,ld.so.cache,passwd"
    assert seen["/dev"] == "listed fd,full,null,random,stderr,stdin,stdout,urandom,zero"
    assert planted["token"] not in json.dumps(seen) and REDACTED not in json.dumps(seen)
    assert result.reward == 1.0  # nothing was obtained (the grader says so itself)


def test_the_grader_is_nobody_and_cannot_read_a_root_only_file(tmp_path):
    grader = python_grader(
        tmp_path,
        """
        import os
        def grade(sample, item):
            try:
                open(__file__).read()  # this very file, bound in read-only, mode 0600, owner root
                readable = "readable"
            except PermissionError:
                readable = "denied"
            ids = [os.getuid(), os.geteuid(), os.getgid(), os.getegid()]
            return {"reward": 1.0, "diagnostics": [str(ids), str(os.getgroups()), readable]}
        """,
    )
    os.chmod(grader.source, 0o600)
    if os.geteuid() != 0:
        pytest.skip("the root-only file needs a service running as root")
    with GraderSandbox(grader, limits(grader)) as sandbox:
        [result] = sandbox.grade([{"output_text": ""}], [{}])
    assert result.diagnostics == ["[65534, 65534, 65534, 65534]", "[]", "denied"], result


def code_tests_sandbox() -> GraderSandbox:
    grader = CodeTestsGrader(type="code_tests", timeout_s=20)
    return GraderSandbox(grader, limits(grader))


def test_a_hostile_code_tests_submission_sees_none_of_the_host(planted):
    solution = "import os\n\ndef leak(p):\n    return os.listdir(p) if os.path.isdir(p) else open(p).read()\n"
    tests = [
        {"name": f"t{i}", "code": f"assert leak({path!r}) == 'x'"} for i, path in enumerate(planted["paths"])
    ]
    tests += [
        {"name": "uid", "code": "assert os.getuid() == 65534, os.getuid()"},
        {"name": "cat", "stdin": "", "stdout": planted["token"]},  # the solution run as a program
    ]
    program = f"print(open({planted['paths'][0]!r}).read())"
    sample = {"output_text": f"```python\n{solution}\nif __name__ == '__main__':\n    {program}\n```"}
    with code_tests_sandbox() as sandbox:
        [result] = sandbox.grade([sample], [{"tests": tests}])
    assert result.error is None and result.hack_flags == [], result
    failed = {line.split(" failed: ")[0]: line for line in result.diagnostics}
    assert "uid" not in failed  # the submission's interpreter runs as nobody too
    for i in range(len(planted["paths"])):
        assert "FileNotFoundError" in failed[f"t{i}"] or "PermissionError" in failed[f"t{i}"], failed[f"t{i}"]
    assert "cat" in failed and "exited with status 1" in failed["cat"]
    assert result.reward == pytest.approx(1 / (len(tests)))  # only the uid test passed
    assert planted["token"] not in str(result)


REPEATING_GRADER = """
def grade(sample, item):
    if item.get("raise"):
        raise RuntimeError("leaking " + item["raise"])
    return {"reward": 1.0, "hack_flags": item["flags"], "diagnostics": item["diagnostics"]}
"""


def test_secrets_a_grader_returns_are_redacted(planted, tmp_path):
    grader = python_grader(tmp_path, REPEATING_GRADER)
    token, env_secret, redis_password = (
        planted["token"],
        planted["env_secret"],
        "redis-pw-" + uuid.uuid4().hex,
    )
    items = [
        {"flags": [f"flag {token}"], "diagnostics": [f"env {env_secret} and {env_secret}", "short abc"]},
        {"raise": f"the redis password {redis_password}"},
    ]
    secrets = tuple(url_password(f"redis://:{redis_password}@redis:6379/0"))
    with GraderSandbox(grader, limits(grader), secrets=secrets) as sandbox:
        first, second = sandbox.grade([{"output_text": ""}] * 2, items)
        assert sandbox.secrets_redacted == 5  # the error names it twice: message and traceback
    assert first.hack_flags == [f"flag {REDACTED}"]
    assert first.diagnostics == [f"env {REDACTED} and {REDACTED}", "short abc"]
    assert redis_password not in second.error and f"leaking the redis password {REDACTED}" in second.error


def test_a_reward_worker_counts_redactions(planted, tmp_path):
    from core.telemetry import MetricsContext

    grader = python_grader(tmp_path, REPEATING_GRADER)
    worker = RewardWorker(limits(grader), "reward-0", MetricsContext("job", str(tmp_path / "targets")))
    rollout = Rollout("p", 0, [1], [2], [-0.1], 0, "stop", text="x")
    try:
        [scored] = worker.score([rollout], [{"flags": [], "diagnostics": [planted["token"]]}])
        record = scored.grading_record()  # what the driver writes to samples.jsonl
        value = worker.metrics.registry.get_sample_value(
            "rft_reward_secrets_redacted_total", {"job": "job", "worker": "reward-0"}
        )
    finally:
        worker.close()
        worker.metrics.close()
    assert record["diagnostics"] == [REDACTED] and planted["token"] not in json.dumps(record)
    assert value == 1.0


def test_rft_grade_output_is_redacted(planted, tmp_path):
    grader = python_grader(tmp_path, REPEATING_GRADER)
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "?", "flags": [], "diagnostics": [planted["env_secret"]]}) + "\n"
    )
    (tmp_path / "samples.jsonl").write_text(json.dumps({"id": "a", "output_text": "x"}) + "\n")
    args = ["--grader", grader.source, "--data", str(tmp_path / "items.jsonl")]
    args += ["--samples", str(tmp_path / "samples.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "grade", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stored = (tmp_path / "out.jsonl").read_text()
    assert planted["env_secret"] not in stored + result.stdout and REDACTED in stored


def test_known_secrets(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("tok-0123456789\n")
    environ = {
        "HOME": str(tmp_path),
        "RFT_CACHE_DIR": "/some/cache/dir",
        "OPENAI_API_KEY": "sk-abcdefgh",
        "DB_PASSWORD": "short",  # under 8 characters: not redacted
        "MY_SECRET": "a-long-secret",
        "PATH": "/usr/bin:/bin",
        "RFT_REDIS_URL": "redis://user:hunter2-hunter2@host:6379/0",
    }
    assert set(known_secrets(("extra-value-1",), environ)) == {
        "tok-0123456789",
        "/some/cache/dir",
        "sk-abcdefgh",
        "a-long-secret",
        "redis://user:hunter2-hunter2@host:6379/0",
        "hunter2-hunter2",
        "extra-value-1",
    }
    assert url_password("redis://localhost:6379") == [] and url_password(None) == []
