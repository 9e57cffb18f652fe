"""core/sandbox session mode itself (SessionSandbox), on the real sandbox with the environment
library as its target: many episodes from many threads, a hung call that holds up only its own
episode, an episode's processes killed with it, the runner killed or hung and replaced."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.sandbox.namespaces import SandboxUnavailableError, namespace_problem
from core.sandbox.processes import parent_pids, tree
from core.sandbox.session import SessionSandbox
from core.sandbox.target import SandboxLimits, SandboxTarget
from rollout_workers.config import EnvironmentSpec
from rollout_workers.environments.client import ENVIRONMENT_FACTORY, runner_spec

pytestmark = pytest.mark.skipif(namespace_problem() is not None, reason="no namespaces for the sandbox")

ENV = """
import json, os, signal, time

# Module-level code runs in the runner itself: this lets an episode hang its runner.
signal.signal(signal.SIGUSR2, lambda *_: time.sleep(3600))

class Environment:
    def reset(self, item):
        self.name, self.calls = item["name"], 0
        return None

    def step(self, message):
        command = json.loads(message["content"])
        self.calls += 1
        return {"messages": [{"role": "user", "content": str(getattr(self, command["do"])(command))}]}

    def count(self, command):
        return f"{self.name}:{self.calls}"

    def hang(self, command):
        while True:
            time.sleep(1)

    def fork(self, command):
        for _ in range(command["children"]):
            if os.fork() == 0:
                signal.pause()
        daemon = os.fork()
        if daemon == 0:  # a daemon: its own session, its parent gone
            os.setsid()
            if os.fork() == 0:
                signal.pause()
            os._exit(0)
        os.waitpid(daemon, 0)
        return "forked"

    def pid(self, command):
        return os.getpid()

    def processes(self, command):
        return sorted(int(pid) for pid in os.listdir("/proc") if pid.isdigit())

    def hang_runner(self, command):
        os.kill(os.getppid(), signal.SIGUSR2)
        return "sent"
"""


def step(command: str, **arguments) -> dict:
    return {"role": "assistant", "content": json.dumps({"do": command, **arguments})}


def said(result) -> str:
    assert result.error is None, result.error
    return result.value["messages"][0]["content"]


@pytest.fixture
def make_sandbox(tmp_path):
    path = tmp_path / "env.py"
    path.write_text(textwrap.dedent(ENV))
    target = SandboxTarget(
        ENVIRONMENT_FACTORY,
        runner_spec(EnvironmentSpec(type="python", path=str(path))),
        label=f"environment {path}",
        role="environment",
        mounts=(str(path),),
    )
    opened = []

    def make(**limits) -> SessionSandbox:
        sandbox = SessionSandbox(target, SandboxLimits(**{"timeout_s": 20.0, **limits}))
        opened.append(sandbox)
        return sandbox

    yield make
    for sandbox in opened:
        sandbox.close()


def test_many_episodes_from_many_threads_keep_their_own_state(make_sandbox):
    sandbox = make_sandbox()

    def episode(name: str) -> list[str]:
        handle, started = sandbox.open({"name": name})
        assert started.value == {"messages": None, "tools": None}
        replies = [said(sandbox.call(handle, "step", step("count"))) for _ in range(5)]
        sandbox.close(handle)
        return replies

    names = [f"e{i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(episode, names))
    assert results == [[f"{name}:{call}" for call in range(1, 6)] for name in names]


def test_a_hung_call_holds_up_only_its_own_episode(make_sandbox):
    sandbox = make_sandbox(timeout_s=3.0)
    hung, _ = sandbox.open({"name": "hung"})
    quick, _ = sandbox.open({"name": "quick"})
    outcome = {}
    caller = threading.Thread(target=lambda: outcome.update(hung=sandbox.call(hung, "step", step("hang"))))
    started = time.monotonic()
    caller.start()
    latencies = []
    while caller.is_alive():
        asked = time.monotonic()
        assert said(sandbox.call(quick, "step", step("count"))).startswith("quick:")
        latencies.append(time.monotonic() - asked)
        caller.join(0.05)  # pacing the quick calls, not synchronising
    assert time.monotonic() - started >= 3.0  # the hung call lasted until its timeout
    assert len(latencies) >= 5 and max(latencies) < 1.5, latencies  # serialised calls would wait 3 s
    assert outcome["hung"].ended and "timed out after 3 s" in outcome["hung"].error
    later = sandbox.call(hung, "step", step("count"))
    assert later.ended and "episode 1 has ended: timed out after 3 s" in later.error


def test_an_episodes_processes_die_with_it(make_sandbox):
    sandbox = make_sandbox()
    bystander, _ = sandbox.open({"name": "bystander"})
    forker, _ = sandbox.open({"name": "forker"})
    forker_pid = int(said(sandbox.call(forker, "step", step("pid"))))
    alone = json.loads(said(sandbox.call(bystander, "step", step("processes"))))
    assert len(alone) == 3 and forker_pid in alone  # the runner and the two episodes' children
    assert said(sandbox.call(forker, "step", step("fork", children=5))) == "forked"
    crowded = json.loads(said(sandbox.call(bystander, "step", step("processes"))))
    assert len(crowded) == len(alone) + 5 + 1  # the daemon outlived its parent, left the group
    sandbox.close(forker)
    after = json.loads(said(sandbox.call(bystander, "step", step("processes"))))
    assert after == [pid for pid in alone if pid != forker_pid]


def test_too_many_episodes_at_once(make_sandbox):
    sandbox = make_sandbox(max_episodes=2)
    first, second = sandbox.open({"name": "a"})[0], sandbox.open({"name": "b"})[0]
    none, refused = sandbox.open({"name": "c"})
    assert none is None and refused.ended and "too many episodes open at once (at most 2)" in refused.error
    sandbox.close(first)
    assert sandbox.open({"name": "d"})[0] is not None and said(sandbox.call(second, "step", step("count")))


def test_a_killed_runner_fails_its_episodes_and_a_new_one_takes_over(make_sandbox):
    sandbox = make_sandbox()
    episodes = [sandbox.open({"name": name})[0] for name in ("a", "b")]
    assert said(sandbox.call(episodes[0], "step", step("count"))) == "a:1"
    first_runner = sandbox.runner_pid
    os.killpg(first_runner, signal.SIGKILL)
    for episode in episodes:
        lost = sandbox.call(episode, "step", step("count"))
        assert lost.ended and "sandbox runner died (killed by SIGKILL)" in lost.error, lost
    fresh, _ = sandbox.open({"name": "c"})
    assert said(sandbox.call(fresh, "step", step("count"))) == "c:1"
    assert sandbox.runner_pid not in (None, first_runner)
    sandbox.close(episodes[0])  # closing a lost episode is harmless


def test_a_hung_runner_is_replaced(make_sandbox):
    sandbox = make_sandbox(timeout_s=1.0)
    victim, _ = sandbox.open({"name": "victim"})
    # The runner now sleeps in the signal handler the module installed; nothing answers.
    sent = sandbox.call(victim, "step", step("hang_runner"))
    hung = sandbox.call(victim, "step", step("count")) if sent.error is None else sent
    assert hung.ended and "sandbox runner did not answer within 6 s" in hung.error, hung
    fresh, _ = sandbox.open({"name": "fresh"})
    assert said(sandbox.call(fresh, "step", step("count"))) == "fresh:1"


def test_a_target_that_does_not_load_fails_every_open(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("class Environment(:\n")
    spec = runner_spec(EnvironmentSpec(type="python", path=str(path)))
    target = SandboxTarget(ENVIRONMENT_FACTORY, spec, label=f"environment {path}", role="environment")
    with SessionSandbox(target, SandboxLimits()) as sandbox:
        for _ in range(2):
            handle, result = sandbox.open({})
            assert handle is None and result.ended
            assert f"environment {path} failed to load: SyntaxError" in result.error


def test_without_namespaces_sessions_refuse_or_run_weakly(no_unshare, make_sandbox):
    with pytest.raises(SandboxUnavailableError, match="cannot isolate environments.*allow_weak_isolation"):
        make_sandbox()
    sandbox = make_sandbox(allow_weak_isolation=True)
    assert sandbox.protections == []
    bystander, _ = sandbox.open({"name": "bystander"})
    forker, _ = sandbox.open({"name": "forker"})
    forker_pid = int(said(sandbox.call(forker, "step", step("pid"))))
    assert said(sandbox.call(forker, "step", step("fork", children=3))) == "forked"
    # Without a pid namespace the runner is a plain process here: its tree is on this /proc.
    forked = tree({forker_pid}, parent_pids())
    assert len(forked) == 1 + 3 + 1  # the daemon stays under the episode's child (a subreaper)
    sandbox.close(forker)
    assert not forked & parent_pids().keys()
    assert said(sandbox.call(bystander, "step", step("count"))) == "bystander:1"


def test_a_hundred_episodes_open_at_once(make_sandbox):
    sandbox = make_sandbox(max_episodes=128)  # each holds 4 of the runner's descriptors
    episodes = [sandbox.open({"name": f"e{i}"})[0] for i in range(100)]
    assert [said(sandbox.call(e, "step", step("count"))) for e in episodes] == [f"e{i}:1" for i in range(100)]
    for episode in episodes:
        sandbox.close(episode)
