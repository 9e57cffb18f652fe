"""Environments in the real sandbox (session mode) through EnvironmentClient: python and tools
environments keep their state between calls; hostile environments cost only their own episode
(each attack is followed by a good call on another open episode); check_environment refuses a
bad spec before any actor starts."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import uuid
from pathlib import Path

import pytest

from core.config import ConfigError
from core.sandbox.namespaces import namespace_problem
from core.sandbox.redaction import REDACTED
from rollout_workers.config import EnvironmentSpec, RolloutConfig
from rollout_workers.environments.client import MAX_OUTPUT_BYTES, EnvironmentClient, check_environment
from services.config import load_config

pytestmark = pytest.mark.skipif(namespace_problem() is not None, reason="no namespaces for the sandbox")

# One python environment with many behaviours, chosen by the assistant message ({"do": ...}).
HOSTILE_ENV = """
import json, os, signal, socket, sys, time

class Environment:
    def __init__(self, greeting="hello"):
        self.greeting = greeting

    def reset(self, item):
        if item.get("reset") == "raise":
            raise RuntimeError("reset broke")
        self.item, self.calls = item, 0
        return [{"role": "user", "content": f"{self.greeting} {item['id']}"}]

    def tools(self):
        return [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]

    def step(self, message):
        self.calls += 1
        command = json.loads(message["content"])
        return getattr(self, "do_" + command["do"])(command)

    def said(self, text, done=False, reward=None):
        return {"messages": [{"role": "user", "content": text}], "done": done, "reward": reward}

    def do_count(self, command):
        return self.said(f"call {self.calls} of {self.item['id']}", reward=0.25)

    def do_finish(self, command):
        return self.said("bye", done=True, reward=1.0)

    def do_raise(self, command):
        raise ValueError("step broke")

    def do_hang(self, command):
        while True:
            time.sleep(1)

    def do_spin(self, command):
        while True:
            pass

    def do_allocate(self, command):
        blocks = []
        while True:  # bytes(n) is calloc'd: address space without touching every page, whose
            blocks.append(bytes(64 * 2**20))  # faults cost CPU time (2 s was hit on a slow box)

    def do_flood(self, command):
        while True:
            sys.stdout.write("x" * 2**20)

    def do_big_reply(self, command):
        return self.said("y" * 2**21)

    def do_garbage(self, command):
        return {"messages": "not a list", "done": "yes", "score": 1}

    def do_connect(self, command):
        socket.create_connection((command["host"], command["port"]), timeout=2)
        return self.said("connected")

    def do_read(self, command):
        try:
            return self.said("read " + open(command["path"]).read())
        except OSError as e:
            return self.said(type(e).__name__)

    def do_fork(self, command):
        for forked in range(command["max"]):
            try:
                if os.fork() == 0:
                    signal.pause()
            except OSError:
                return self.said(str(forked))
        return self.said(str(command["max"]))

    def do_exit(self, command):
        os._exit(4)

    def do_echo(self, command):
        return self.said(command["text"])
"""

TOOLS_ENV = '''
from __future__ import annotations

def setup(item):
    return {"total": item["start"], "log": []}

def add(amount: int, state) -> str:
    """Add to the running total and return it.

    Args:
        amount: what to add
    """
    state["total"] += amount
    state["log"].append(amount)
    return str(state["total"])

def history(state) -> list:
    """The amounts added so far."""
    return state["log"]

def divide(by: float) -> float:
    """100 divided by a number."""
    return 100 / by

def _helper():
    """Private: not a tool."""
'''


def write(directory: Path, code: str, name: str = "env.py") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def rollout(**overrides) -> RolloutConfig:
    # A generous wall-clock limit: shared test machines can be very busy.
    settings = dict(environment_timeout_s=20.0, environment_cpu_s=2, environment_memory_mb=512)
    return RolloutConfig(**{**settings, **overrides})


def do(what: str, **arguments) -> str:
    return json.dumps({"do": what, **arguments})


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    spec = EnvironmentSpec(type="python", path=write(tmp_path_factory.mktemp("env"), HOSTILE_ENV))
    with EnvironmentClient(spec, rollout()) as client:
        yield client


def attack_then_good(client: EnvironmentClient, command: str, item_id: str = "attacker"):
    """One hostile step in its own episode, then a good step in an episode opened before it."""
    bystander = client.reset({"id": "bystander"})
    attacker = client.reset({"id": item_id})
    try:
        result = client.step(attacker.handle, command)
        good = client.step(bystander.handle, do("count"))
        assert (good.messages[0]["content"], good.error) == ("call 1 of bystander", None), good
    finally:
        client.close(attacker.handle)
        client.close(bystander.handle)
    return result


# -- ordinary episodes -----------------------------------------------------------------------


def test_python_environment_keeps_its_state_between_calls(hostile):
    assert "no network (empty network namespace)" in hostile.protections
    assert hostile.describe() == [
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    ]
    first, second = hostile.reset({"id": "a"}), hostile.reset({"id": "b"})
    assert first.messages == [{"role": "user", "content": "hello a"}] and first.tools == hostile.describe()
    for call in (1, 2, 3):
        for start, name in ((first, "a"), (second, "b")):
            step = hostile.step(start.handle, do("count"))
            assert (step.messages, step.done, step.reward) == (
                [{"role": "user", "content": f"call {call} of {name}"}],
                False,
                0.25,
            )
    assert (hostile.step(first.handle, do("finish")).done, hostile.step(second.handle, do("count")).done) == (
        True,
        False,
    )
    hostile.close(first.handle)
    hostile.close(second.handle)


def test_options_reach_the_class(tmp_path):
    spec = EnvironmentSpec(type="python", path=write(tmp_path, HOSTILE_ENV), options={"greeting": "hi"})
    with EnvironmentClient(spec, rollout()) as client:
        assert client.reset({"id": "x"}).messages == [{"role": "user", "content": "hi x"}]


def test_tools_environment_runs_a_multi_call_episode(tmp_path):
    spec = EnvironmentSpec(type="tools", path=write(tmp_path, TOOLS_ENV))
    with EnvironmentClient(spec, rollout()) as client:
        assert [t["function"]["name"] for t in client.describe()] == ["add", "history", "divide"]
        add = client.describe()[0]["function"]
        assert add["description"] == "Add to the running total and return it."
        assert add["parameters"]["properties"] == {
            "amount": {"type": "integer", "description": "what to add"}
        }
        ten, five = client.reset({"start": 10}), client.reset({"start": 5})
        assert ten.messages is None and ten.tools == client.describe()  # the item's own prompt
        call = '<tool_call>{"name": "add", "arguments": {"amount": %d}}</tool_call>'
        step = client.step(ten.handle, "Adding. " + call % 2 + call % 3)
        assert [m["content"] for m in step.messages] == ["12", "15"] and not step.done
        assert client.step(five.handle, call % 1).messages[0]["content"] == "6"
        step = client.step(ten.handle, '<tool_call>{"name": "history", "arguments": {}}</tool_call>')
        assert step.messages == [{"role": "tool", "content": "[2, 3]", "name": "history"}]
        final = client.step(ten.handle, "The total is 15.")
        assert (final.messages, final.done, final.error) == ([], True, None)


def test_a_tool_call_reward_is_paid_once_an_episode_when_its_calls_ran(tmp_path):
    spec = EnvironmentSpec(type="tools", path=write(tmp_path, TOOLS_ENV + "\nTOOL_CALL_REWARD = 0.25\n"))
    with EnvironmentClient(spec, rollout()) as client:
        episode = client.reset({"start": 1})
        bad = client.step(
            episode.handle, '<tool_call>{"name": "add", "arguments": {"amount": "x"}}</tool_call>'
        )
        assert bad.reward is None and bad.messages[0]["content"].startswith("Error: invalid arguments")
        call = '<tool_call>{"name": "add", "arguments": {"amount": 2}}</tool_call>'
        assert client.step(episode.handle, call).reward == 0.25
        assert client.step(episode.handle, call).reward is None  # once: calling again earns nothing
        assert client.step(episode.handle, "Done: 5.").reward is None


def test_a_tool_that_raises_is_observed_or_ends_the_episode(tmp_path):
    spec = EnvironmentSpec(type="tools", path=write(tmp_path, TOOLS_ENV))
    call = '<tool_call>{"name": "divide", "arguments": {"by": 0}}</tool_call>'
    with EnvironmentClient(spec, rollout()) as client:
        episode = client.reset({"start": 0})
        step = client.step(episode.handle, call)
        assert (
            step.messages[0]["content"]
            == "Error: tool divide raised ZeroDivisionError: float division by zero"
        )
        assert not step.done and "ZeroDivisionError" in step.error
        assert client.step(episode.handle, call.replace(": 0", ": 4")).messages[0]["content"] == "25.0"
    with EnvironmentClient(spec, rollout(environment_errors="end")) as client:
        step = client.step(client.reset({"start": 0}).handle, call)
        assert (step.messages, step.done) == ([], True) and "division by zero" in step.error


# -- faults -----------------------------------------------------------------------------------


def test_a_step_that_raises_gives_an_error_observation(hostile):
    result = attack_then_good(hostile, do("raise"))
    assert result.messages == [
        {"role": "user", "content": "Error: environment raised ValueError: step broke"}
    ]
    assert not result.done and "env.py" in result.error  # the traceback names the user's file


def test_with_environment_errors_end_a_raise_ends_the_episode(tmp_path):
    spec = EnvironmentSpec(type="python", path=write(tmp_path, HOSTILE_ENV))
    with EnvironmentClient(spec, rollout(environment_errors="end")) as client:
        result = attack_then_good(client, do("raise"))
    assert (result.messages, result.done) == ([], True) and "step broke" in result.error


def test_a_hang_times_out_and_other_episodes_still_answer(tmp_path):
    spec = EnvironmentSpec(type="python", path=write(tmp_path, HOSTILE_ENV))
    with EnvironmentClient(spec, rollout(environment_timeout_s=2.0)) as client:
        result = attack_then_good(client, do("hang"))
    assert result.messages == [{"role": "user", "content": "Error: timed out after 2 s (wall-clock limit)"}]
    assert result.done and result.error == "timed out after 2 s (wall-clock limit)"  # its process is gone


@pytest.mark.parametrize(
    "command, reason",
    [
        (do("exit"), "environment process exited with status 4 before replying"),
        (do("spin"), "exceeded the CPU-time limit of 2 s"),
        (do("flood"), f"wrote more than {MAX_OUTPUT_BYTES} bytes of output"),
        (do("big_reply"), f"sent a reply of more than {MAX_OUTPUT_BYTES} bytes"),
    ],
)
def test_faults_that_end_the_process_end_the_episode(hostile, command, reason):
    result = attack_then_good(hostile, command)
    assert result.done and reason in result.error, result
    assert result.messages[0]["content"].startswith("Error: ")


def test_memory_and_garbage_are_errors_the_episode_survives(hostile):
    memory = attack_then_good(hostile, do("allocate"))
    assert not memory.done and "exceeded the memory limit (512 MB)" in memory.error
    garbage = attack_then_good(hostile, do("garbage"))
    assert not garbage.done and "what step returned is not what docs/agentic.md asks for" in garbage.error
    for field in ("messages", "done", "score"):
        assert field in garbage.error


def test_no_network(hostile):
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        for host, port in (("1.1.1.1", 53), ("127.0.0.1", listener.getsockname()[1])):
            result = attack_then_good(hostile, do("connect", host=host, port=port))
            assert "Network is unreachable" in result.error or "Connection refused" in result.error
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


def test_host_files_are_out_of_view(hostile, tmp_path):
    secret = tmp_path / "secret.txt"  # under the host's /tmp, which the sandbox hides
    secret.write_text("secret")
    for path in (str(secret), "/etc/shadow", os.path.expanduser("~/.ray/auth_token")):
        result = attack_then_good(hostile, do("read", path=path))
        assert result.messages[0]["content"] in ("FileNotFoundError", "PermissionError"), (path, result)


def test_forks_are_bounded_and_die_with_their_episode(hostile):
    result = attack_then_good(hostile, do("fork", max=1000))
    assert result.error is None and 0 < int(result.messages[0]["content"]) < 100


def test_a_failed_reset_has_no_episode(hostile):
    start = hostile.reset({"id": "x", "reset": "raise"})
    assert start.handle is None and "reset broke" in start.error
    step = hostile.step(start.handle, do("count"))
    assert step.done and "reset failed" in step.error


def test_secrets_are_redacted_from_observations(hostile, monkeypatch):
    secret = "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("RFT_TEST_TOKEN", secret)
    result = attack_then_good(hostile, do("echo", text=f"the token is {secret}"))
    assert result.messages[0]["content"] == f"the token is {REDACTED}"


# -- checked at job start ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, code, class_name, reason",
    [
        ("python", "class Environment(:\n", None, "SyntaxError"),
        ("python", "raise RuntimeError('broken at import')\n", None, "broken at import"),
        ("python", "class Other:\n    pass\n", None, "it defines no class Environment"),
        ("python", HOSTILE_ENV, "Game", "it defines no class Game"),
        ("python", "class Environment:\n    def reset(self, item): pass\n", None, "has no method step"),
        (
            "python",
            "class Environment:\n    reset = step = print\n    def tools(self): return 'x'\n",
            None,
            "its tools",
        ),
        ("tools", "X = 1\n", None, "defines no tools"),
        ("tools", "import socket\ndef f(s: socket.socket): pass\n", None, "tool f: no JSON schema"),
    ],
)
def test_check_environment_refuses_what_cannot_run(tmp_path, kind, code, class_name, reason):
    spec = EnvironmentSpec(type=kind, path=write(tmp_path, code, "broken_env.py"), class_name=class_name)
    with pytest.raises(ConfigError) as raised:
        check_environment(spec, rollout())
    assert (
        reason in str(raised.value)
        and "broken_env.py" in str(raised.value)
        and "rollout.environment" in str(raised.value)
    )


def test_check_environment_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="rollout.environment.path: .*nowhere.py not found"):
        check_environment(EnvironmentSpec(type="tools", path=str(tmp_path / "nowhere.py")), rollout())


def test_check_environment_accepts_a_good_one(tmp_path):
    check_environment(EnvironmentSpec(type="tools", path=write(tmp_path, TOOLS_ENV)), rollout())


def test_spec_rules():
    with pytest.raises(ValueError, match="class_name and options are for types python and agent"):
        EnvironmentSpec(type="tools", path="t.py", options={"a": 1})
    config = RolloutConfig()
    assert (
        config.environment,
        config.max_turns,
        config.max_episode_tokens,
        config.max_tool_output_tokens,
    ) == (
        None,
        8,
        2048,
        256,
    )
    assert (config.environment_timeout_s, config.environment_errors) == (10.0, "observe")


def test_a_job_config_resolves_the_environment_path(tmp_path):
    write(tmp_path, TOOLS_ENV, "tools.py")
    (tmp_path / "grader.py").write_text("def grade(sample, item):\n    return 1.0\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        "data: {train: train.jsonl}\nreward: {grader: {source: grader.py}}\n"
        "rollout: {environment: {type: tools, path: tools.py}, max_turns: 4, environment_errors: end}\n"
    )
    cfg = load_config(job)
    assert cfg.rollout.environment.path == str(tmp_path / "tools.py") and cfg.rollout.max_turns == 4
    check_environment(cfg.rollout.environment, cfg.rollout)
