"""llm_judge / score_model: the judge is called in the process holding the sandbox, the reward
comes out of the real sandbox.

Replies are controlled with a real HTTP server started here that speaks the OpenAI
chat-completions protocol (its reply is chosen by the response text being judged); one slow
test runs the embedded SmolLM2 as a local judge.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from reward_workers.config import RewardConfig
from reward_workers.grader_spec import check_grader
from reward_workers.graders.llm_judge import parse_score
from reward_workers.sandbox import GraderSandbox

LIMITS = dict(timeout_s=20.0, cpu_s=5, memory_mb=1024)
ITEM = {"id": "q", "prompt": "Name the capital of France.", "reference_answer": "Paris"}


class ChatCompletions(BaseHTTPRequestHandler):
    """POST /v1/chat/completions; the reply is REPLIES[the judged response] (set per server)."""

    replies: dict[str, str] = {}
    requests: list[dict] = []
    status = 200

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        judged = body["messages"][-1]["content"].rsplit("Response:\n", 1)[-1]
        answer = {
            "id": "c",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": self.replies.get(judged, "no idea")},
                }
            ],
        }
        payload = json.dumps(answer if self.status == 200 else {"error": {"message": "overloaded"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    handler = type("Handler", (ChatCompletions,), {"replies": {}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def grade(spec: dict, texts: list[str], item: dict = ITEM):
    cfg = RewardConfig(grader=spec, **LIMITS)
    check_grader(cfg.grader)  # llm_judge is no longer refused at job start
    with GraderSandbox(cfg.grader, cfg) as sandbox:
        return sandbox.grade([{"output_text": text} for text in texts], [item] * len(texts))


def test_parse_score_forms_and_range():
    assert parse_score("Score: 7", 0, 10) == (7.0, None)
    assert parse_score('{"score": 0.25, "reason": "meh"}', 0, 1) == (0.25, None)
    assert parse_score("score: 2, then after thinking, Score: 4", 0, 5) == (4.0, None)
    assert parse_score("Reasoning... I'd give it 8/10. Or 6 out of 10.", 0, 10) == (6.0, None)
    assert parse_score(" 3. ", 1, 5) == (3.0, None)
    assert parse_score("Score: 12", 0, 10) == (None, "score 12 is outside the range [0, 10]")
    assert parse_score("It is good, 9 of them", 0, 10)[0] is None
    assert parse_score("7/100", 0, 10)[0] is None  # a fraction of something else


def test_rubric_judge_over_http_scores_normalised(endpoint, monkeypatch):
    handler, base_url = endpoint
    handler.replies.update(
        {
            "Paris": "Score: 10",
            "Lyon": "The answer is wrong. Score: 2",
            "Paris, I think": '{"score": 7.5}',
            "Berlin": "I cannot judge this.",
            "Marseille": "Score: 11",
        }
    )
    monkeypatch.setenv("JUDGE_KEY", "secret-1")
    spec = {
        "type": "llm_judge",
        "name": "judge",
        "base_url": base_url,
        "model": "judge-1",
        "api_key_env": "JUDGE_KEY",
        "rubric": "10 if the answer is correct, 0 if it is wrong.",
        "range": [0, 10],
        "pass_threshold": 7,
        "sampling_params": {"max_completions_tokens": 16},
    }
    results = grade(spec, ["Paris", "Lyon", "Paris, I think", "Berlin", "Marseille"])
    assert [r.error for r in results] == [None] * 5
    assert [r.reward for r in results] == [1.0, 0.2, 0.75, 0.0, 0.0]
    assert results[2].components == {"score": 7.5, "parsed": 1.0, "passed": 1.0}
    assert results[1].components["passed"] == 0.0
    assert results[3].components == {"parsed": 0.0} and "no score found" in results[3].diagnostics[0]
    assert "outside the range [0, 10]" in results[4].diagnostics[0]
    first = handler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret-1"
    body = first["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-1", 0.0, 16)
    system, user = body["messages"]
    assert "10 if the answer is correct" in system["content"] and "from 0 to 10" in system["content"]
    assert user["content"] == "Task:\nName the capital of France.\n\nResponse:\nParis"


def test_openai_score_model_json_runs_in_a_multi(endpoint):
    handler, base_url = endpoint
    handler.replies.update({"Paris": "1", "paris": "0.5"})
    score_model = {
        "type": "score_model",
        "name": "judge",
        "model": "o4-mini-2025-04-16",
        "base_url": base_url,
        "input": [
            {"role": "system", "content": "Rate 0-1."},
            {"role": "user", "content": "Q: {{item.prompt}}\nResponse:\n{{sample.output_text}}"},
        ],
        "range": [0, 1],
        "sampling_params": {"temperature": 0, "seed": 3},
    }
    exact = {
        "type": "string_check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference_answer}}",
        "operation": "eq",
    }
    spec = {
        "type": "multi",
        "graders": {"judge": score_model, "exact": exact},
        "calculate_output": "0.5 * judge + 0.5 * exact",
    }
    results = grade(spec, ["Paris", "paris"])
    assert [(r.reward, r.error) for r in results] == [(1.0, None), (0.25, None)]
    assert results[1].components["judge"] == 0.5 and handler.requests[0]["body"]["seed"] == 3
    assert (
        handler.requests[0]["body"]["messages"][1]["content"]
        == "Q: Name the capital of France.\nResponse:\nParis"
    )


def test_endpoint_failures_are_grader_errors(endpoint):
    handler, base_url = endpoint
    handler.status = 503
    spec = {"type": "llm_judge", "base_url": base_url, "model": "m", "rubric": "r"}
    (result,) = grade(spec, ["Paris"])
    assert result.reward == 0.0 and "the judge call failed" in result.error and "HTTP 503" in result.error
    missing = {**spec, "rubric": None, "input": [{"role": "user", "content": "{{item.nothing}}"}]}
    (result,) = grade(missing, ["Paris"])
    assert "item has no field 'nothing'" in result.error


def test_spec_errors_name_the_field():
    base = {"type": "llm_judge", "model": "m"}
    with pytest.raises(ValidationError, match="give input .* or rubric, exactly one"):
        RewardConfig(grader=base, **LIMITS)
    with pytest.raises(ValidationError, match=r"sampling_params: unknown keys \['temp'\]"):
        RewardConfig(grader={**base, "rubric": "r", "sampling_params": {"temp": 0}}, **LIMITS)
    with pytest.raises(ValidationError, match=r"must be \[low, high\]"):
        RewardConfig(grader={**base, "rubric": "r", "range": [1, 0]}, **LIMITS)
    with pytest.raises(
        FileNotFoundError,
        match=r"model 'o4-mini' is neither a local model directory nor 'default' "
        r".*for a served model give base_url",
    ):
        grade({"type": "score_model", "model": "o4-mini", "input": [{"role": "user", "content": "x"}]}, ["x"])


@pytest.mark.slow
def test_embedded_model_as_local_judge_is_deterministic():
    spec = {
        "type": "llm_judge",
        "model": "default",
        "range": [0, 10],
        "rubric": "10 if the response names the right capital, 0 otherwise.",
    }
    first = grade(spec, ["Paris", "Berlin"])
    again = grade(spec, ["Paris", "Berlin"])
    for result, repeat in zip(first, again):
        assert result.error is None and 0.0 <= result.reward <= 1.0
        assert (result.reward, result.components, result.diagnostics) == (
            repeat.reward,
            repeat.components,
            repeat.diagnostics,
        )
