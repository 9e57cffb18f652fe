"""`agent` environments: the user's agent program, written against an OpenAI-compatible
`/v1/chat/completions` (any client or framework), trained as it runs (docs/agentic.md).

The user file defines `run(item, base_url) -> reward | None` (default name `run`; `class_name`
names another function). In the episode's sandboxed child, `run` runs on a thread with `base_url`
pointing at an endpoint on the sandbox's own loopback, served by this module. The endpoint turns
the agent's calls into the episode's turns, so the rollout worker's engine generates every reply
and the trajectory is its token ids, exactly as for the other environments:
  - the first request's messages (and tools) are the episode's start (`reset`);
  - the reply to a request is the model's next turn (`step` hands it over), with `tool_calls`
    parsed from its `<tool_call>` blocks when the request offered tools;
  - the messages the agent adds before its next request (tool results, user turns) are the
    observations of that step; the agent's return ends the episode, its value the reward.
A request must extend the conversation: the messages sent before, in order, unchanged (the model's
replies at their places; their content is not compared, the trajectory keeps the model's own
tokens), then new tool/user messages. One that does not, or an agent that raises, ends the
episode with the reason; the agent gets an HTTP error. Sampling parameters of a request
(temperature, max_tokens, n, stream) are the job's, not the request's: the learner must score
what was sampled under the job's sampling.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rollout_workers.environments.tool_calls import parse_tool_calls

MODEL_NAME = "rft-policy"
OBSERVATION_ROLES = ("tool", "user")


class ConversationError(ValueError):
    """A request that does not extend the episode's conversation."""


@dataclass
class _Request:
    """One chat-completions call, waiting for the model's reply."""

    new_messages: list[dict]
    tools: list[dict] | None
    reply: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))  # the assistant text


def _text(content) -> str:
    """OpenAI content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _message(raw: dict) -> dict:
    kept = {key: raw[key] for key in ("name", "tool_call_id") if isinstance(raw.get(key), str)}
    return {"role": raw.get("role"), "content": _text(raw.get("content")), **kept}


class Conversation:
    """What the agent has sent so far; checks that each request extends it."""

    def __init__(self):
        self.messages: list[dict] = []

    def extend(self, raw_messages) -> list[dict]:
        """The new messages of a request (after the last model reply), checked."""
        if not isinstance(raw_messages, list) or not all(isinstance(m, dict) for m in raw_messages):
            raise ConversationError('"messages" must be a list of message objects')
        messages = [_message(m) for m in raw_messages]
        known = len(self.messages)
        for index, (before, now) in enumerate(zip(self.messages, messages)):
            same = before["role"] == now["role"] and (now["role"] == "assistant" or before == now)
            if not same:
                raise ConversationError(
                    f"message {index} ({now['role']}) differs from what this episode sent before: a "
                    "request must repeat the conversation unchanged and add to its end (the trajectory "
                    "is append-only)"
                )
        new = messages[known:]
        if not new:
            raise ConversationError("the request adds no message after the model's last reply")
        # The first request is the prompt (few-shot assistant turns included); later ones add
        # observations only: the model writes the assistant turns.
        allowed = OBSERVATION_ROLES if known else ("system", "user", "assistant", "tool")
        wrong = [m["role"] for m in new if m["role"] not in allowed]
        if wrong:
            raise ConversationError(
                f"new messages may only be {' or '.join(allowed)} messages, got {wrong}: the model writes "
                "the assistant turns"
            )
        self.messages = messages
        return new

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def completion_body(text: str, offered_tools: bool) -> dict:
    """The OpenAI chat.completion object for the model's reply."""
    calls = [c for c in parse_tool_calls(text) if c.problem is None] if offered_tools else []
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {
                "id": f"call_{index}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for index, call in enumerate(calls)
        ]
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_NAME,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
    }


def _reward(value) -> float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise TypeError(f"run returned {type(value).__name__}; expected a number (the reward) or None")


class AgentSession:
    """One episode: the agent's thread, the endpoint it calls, and the call waiting for a reply."""

    def __init__(self, run, item: dict, options: dict):
        self.events: queue.Queue = queue.Queue()  # _Request, or ("ended", reward) / ("failed", why)
        self.conversation = Conversation()
        self.lock = threading.Lock()
        self.waiting: _Request | None = None  # the call the model's next turn answers
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self._run_agent, args=(run, item, options), daemon=True).start()

    def _run_agent(self, run, item: dict, options: dict) -> None:
        try:
            self.events.put(("ended", _reward(run(item, self.base_url, **options))))
        except BaseException as e:  # noqa: BLE001 - the episode ends with the reason
            self.events.put(("failed", f"the agent raised {type(e).__name__}: {e}"))

    def request(self, body: dict) -> _Request:
        """A call from the agent (the endpoint's thread): checked, queued for the model's turn."""
        if body.get("stream") or (body.get("n") or 1) != 1:
            raise ConversationError("streaming and n > 1 are not served: one reply per request")
        with self.lock:
            if self.waiting is not None:
                raise ConversationError("one request at a time per episode: the last one is unanswered")
            new = self.conversation.extend(body.get("messages"))
            self.waiting = _Request(new, body.get("tools") or None)
        self.events.put(self.waiting)
        return self.waiting

    def refuse(self, reason: str) -> None:
        self.events.put(("failed", f"the agent's request was refused: {reason}"))

    def next_event(self) -> dict:
        """What comes after the model's turn: the agent's next request (its new messages are the
        observations), or its end."""
        event = self.events.get()
        if isinstance(event, _Request):
            return {"messages": event.new_messages, "done": False}
        kind, value = event
        return {"messages": [], "done": True, **({"reward": value} if kind == "ended" else {"error": value})}

    def start(self) -> dict:
        first = self.next_event()
        if first["done"]:
            raise RuntimeError(first.get("error") or "the agent returned before its first request")
        return {"messages": first["messages"], "tools": self.waiting.tools}

    def step(self, message: dict) -> dict:
        """The model's turn: the reply to the waiting call."""
        with self.lock:
            waiting, self.waiting = self.waiting, None
            self.conversation.add_reply(message["content"])
        waiting.reply.put(message["content"])
        return self.next_event()


def _handler(session: AgentSession):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
            self._send(404, _error(f"no route {self.path}"))

        def do_POST(self):
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, _error(f"no route {self.path}"))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                request = session.request(body if isinstance(body, dict) else {})
            except (ConversationError, ValueError) as e:
                session.refuse(str(e))
                return self._send(400, _error(str(e)))
            self._send(200, completion_body(request.reply.get(), offered_tools=bool(request.tools)))

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # the episode's output is bounded: no access log
            pass

    return Handler


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}


class AgentEnvironment:
    """start(item) for a user's agent function; it has no tools of its own (its requests bring them)."""

    def __init__(self, module: types.ModuleType, spec: dict):
        name = spec.get("class_name") or "run"
        self._run = getattr(module, name, None)
        if not callable(self._run):
            raise ValueError(f"it defines no function {name}(item, base_url)")
        self._options = spec.get("options") or {}

    def describe(self):
        return None

    def __call__(self, item: dict):
        session = AgentSession(self._run, item, self._options)
        return session, session.start()
