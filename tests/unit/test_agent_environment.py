"""`agent` environments in the real sandbox: an agent program written against the OpenAI client
(`openai.OpenAI(base_url=...)`) is driven turn by turn through EnvironmentClient, as a rollout
worker drives it: its first request is the episode's start, each reply it gets is the model's
turn, the messages it adds are the observations, its return the reward. A request that rewrites
the conversation ends the episode with the reason; the agent's loopback is the sandbox's own."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest

from core.sandbox.namespaces import namespace_problem
from rollout_workers.config import EnvironmentSpec, RolloutConfig
from rollout_workers.environments.client import EnvironmentClient, check_environment

pytestmark = pytest.mark.skipif(namespace_problem() is not None, reason="no namespaces for the sandbox")
pytest.importorskip("openai")

AGENT = """
import json
from openai import OpenAI

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                         "required": ["a", "b"]}}}]

def run(item, base_url, rewrite=False):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Use the tools."},
                {"role": "user", "content": f"Question {item['id']}"}]
    while True:
        reply = client.chat.completions.create(model="rft-policy", messages=messages, tools=TOOLS)
        message = reply.choices[0].message
        if not message.tool_calls:
            return 0.5 if "5" in message.content else 0.0
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            total = arguments["a"] + arguments["b"]
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(total)})
        if rewrite:
            messages[1]["content"] = "Another question"
"""

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def client_for(tmp_path, source: str, **spec) -> EnvironmentClient:
    path = tmp_path / "agent.py"
    path.write_text(textwrap.dedent(source))
    rollout = RolloutConfig(environment_timeout_s=30, environment_memory_mb=4096)
    return EnvironmentClient(EnvironmentSpec(type="agent", path=str(path), **spec), rollout)


def test_an_openai_client_agent_is_driven_turn_by_turn(tmp_path):
    with client_for(tmp_path, AGENT) as client:
        assert "no network (own network namespace: its loopback only)" in client.protections
        start = client.reset({"id": "q1"})
        assert start.error is None
        assert start.messages == [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Question q1"},
        ]
        assert [tool["function"]["name"] for tool in start.tools] == ["add"]
        # The model's turn is the reply; the agent ran the tool it asked for and called again.
        called = client.step(start.handle, f"Let me add. {CALL}")
        assert called.error is None and not called.done
        assert called.messages == [{"role": "tool", "content": "5", "tool_call_id": "call_0"}]
        answered = client.step(start.handle, "The sum is 5.")  # no call: the agent returns its reward
        assert answered.done and answered.reward == 0.5 and answered.messages == []
        client.close(start.handle)


def test_an_agent_that_rewrites_the_conversation_ends_its_episode_with_the_reason(tmp_path):
    with client_for(tmp_path, AGENT, options={"rewrite": True}) as client:
        start = client.reset({"id": "q2"})
        result = client.step(start.handle, CALL)
        assert result.done and "differs from what this episode sent before" in result.error
        assert "append-only" in result.error


def test_an_agent_reaches_nothing_outside_the_sandbox(tmp_path):
    host_listener = socket.create_server(("127.0.0.1", 0))  # on the host's loopback
    port = host_listener.getsockname()[1]
    source = f"""
    import socket

    def run(item, base_url):
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 80)]:
            try:
                socket.create_connection(address, timeout=2).close()
            except OSError:
                continue
            raise RuntimeError(f"reached {{address}}")
        raise RuntimeError("nothing reachable, as it should be")
    """
    try:
        with client_for(tmp_path, source) as client:
            start = client.reset({"id": "q3"})
            assert start.handle is None and "nothing reachable, as it should be" in start.error
    finally:
        host_listener.close()


def test_a_file_without_the_agent_function_is_refused_at_job_start(tmp_path):
    path = tmp_path / "agent.py"
    path.write_text("def main(item, base_url):\n    return None\n")
    with pytest.raises(Exception, match=r"no function run\(item, base_url\)"):
        check_environment(EnvironmentSpec(type="agent", path=str(path)), RolloutConfig())


def test_the_calculator_agent_example_runs_the_tool_the_model_asks_for(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "calculator_agent"
    item = json.loads((example / "train.jsonl").read_text().splitlines()[0])
    rollout = RolloutConfig(environment_timeout_s=30, environment_memory_mb=4096)
    spec = EnvironmentSpec(type="agent", path=str(example / "agent.py"))
    with EnvironmentClient(spec, rollout) as client:
        start = client.reset(item)
        assert start.messages == item["messages"] and start.tools[0]["function"]["name"] == "calculate"
        call = '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>'
        result = client.step(start.handle, call % item["expression"])
        assert [m["content"] for m in result.messages] == [item["reward_model"]["ground_truth"]]
        refused = client.step(start.handle, call % "__import__('os').system('id')")
        assert refused.messages[0]["content"].startswith("Error: use numbers")
        answered = client.step(start.handle, f"Answer: {item['reward_model']['ground_truth']}")
        assert answered.done and answered.reward is None and answered.error is None
