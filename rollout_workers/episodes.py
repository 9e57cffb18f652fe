"""One multi-turn episode as a rollout worker runs it (docs/agentic.md).

The engine loop generates each turn like any request (it joins the running batch); between turns
the episode, on a thread of the worker's environment pool, hands the model's message to the
environment (sandboxed, `rollout_workers/environments/`), appends the observation as the chat
template's delta, and asks for the next turn. What it keeps is token-exact: the model's ids and
behaviour log-probs as the engine produced them, observation ids with log-prob 0 and loss mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from core.tokens import token_checksum

from .chat_render import ChatRenderer
from .interface import Completion, GenerationRequest


class EnvironmentSessions(Protocol):
    """The trusted side of a sandboxed environment (rollout_workers/environments/client.py)."""

    def reset(self, item: dict) -> Any: ...  # .handle, .messages (None: the item's own), .error
    def step(self, handle, assistant_text: str) -> Any: ...  # .messages, .done, .reward, .error
    def close(self, handle) -> None: ...


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_episode_tokens: int  # model + observation tokens after the prompt
    max_tool_output_tokens: int  # per observation message
    max_context_tokens: int  # the engine's longest sequence: prompt + everything after it


@dataclass
class EpisodeCompletion(Completion):
    """A finished episode: `completion_ids` = every id after `prompt_ids` (model and observation
    tokens interleaved), `text` = the last assistant message (what the grader scores)."""

    prompt_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    turn_versions: list[int] = field(default_factory=list)
    environment_reward: float = 0.0
    error: str | None = None
    token_checksum: str = ""

    def trajectory(self) -> dict:
        """The Rollout fields only an episode has."""
        return {
            "loss_mask": self.loss_mask,
            "turns": self.turns,
            "turn_versions": self.turn_versions,
            "environment_reward": self.environment_reward,
            "token_checksum": self.token_checksum,
            "error": self.error,
        }


class EpisodeFactory:
    """A worker's episodes: one sandboxed environment (its sessions) and one renderer for all."""

    def __init__(self, rollout, engine):
        from transformers import AutoTokenizer

        from .environments.client import EnvironmentClient

        self.environment = EnvironmentClient(rollout.environment, rollout)
        tokenizer = AutoTokenizer.from_pretrained(engine.model_path)
        self.renderer = ChatRenderer(tokenizer, self.environment.describe(), name=engine.model_path)
        self.limits = EpisodeLimits(
            rollout.max_turns,
            rollout.max_episode_tokens,
            rollout.max_tool_output_tokens,
            engine.max_model_len,
        )

    def for_batch(self, max_new_tokens: int):
        """What the engine loop calls for each request of a batch: its new Episode."""
        return lambda request: Episode(request, self.environment, self.renderer, self.limits, max_new_tokens)

    def close(self) -> None:
        self.environment.close()


def item_messages(item: dict) -> list[dict]:
    if item.get("messages") is not None:
        return list(item["messages"])
    return [{"role": "user", "content": item["prompt"]}]


class Episode:
    def __init__(
        self,
        request: GenerationRequest,
        environment: EnvironmentSessions,
        renderer: ChatRenderer,
        limits: EpisodeLimits,
        max_new_tokens: int,
    ):
        self.request, self.environment, self.renderer = request, environment, renderer
        self.limits, self.max_new_tokens = limits, max_new_tokens
        self.handle = None
        self.messages: list[dict] = []
        self.prompt_ids: list[int] = []
        self.completion_ids: list[int] = []
        self.behaviour_logprobs: list[float] = []
        self.loss_mask: list[int] = []
        self.turns: list[dict] = []
        self.turn_versions: list[int] = []
        self.environment_reward = 0.0
        self.error: str | None = None
        self.finish_reason = "stop"
        self.last_text = ""

    # ---- the steps (on the environment pool, never on the engine loop thread)

    def start(self) -> bool:
        """Reset the environment for the item; False when it failed (the episode is over)."""
        started = self.environment.reset(self.request.item)
        self.handle = started.handle
        if started.error:
            return self._finish("environment_error", started.error)
        self.messages = started.messages or item_messages(self.request.item)
        self.prompt_ids = self.renderer.prompt_ids(self.messages)
        self.turns = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        if self.turn_budget() < 1:  # the engine would refuse it (and stop serving every request)
            context = len(self.prompt_ids)
            self.prompt_ids = []
            return self._finish(
                "error",
                f"the episode's first context has {context} tokens, the engine holds "
                f"{self.limits.max_context_tokens} (data.max_prompt_tokens + rollout.max_episode_tokens, "
                "at most the model's context)",
            )
        return True

    def after_turn(self, completion: Completion, version: int) -> bool:
        """Take the model's turn, give it to the environment; True when another turn follows."""
        self.completion_ids += completion.completion_ids
        self.behaviour_logprobs += completion.behaviour_logprobs
        self.loss_mask += [1] * len(completion.completion_ids)
        self.turn_versions.append(version)
        self.last_text = completion.text
        assistant = {"role": "assistant", "content": completion.text}
        self.messages.append(assistant)
        self.turns.append({**assistant, "policy_version": version, "tokens": len(completion.completion_ids)})
        reply = self.environment.step(self.handle, completion.text)
        self.environment_reward += reply.reward or 0.0
        if reply.done:
            return self._finish("environment_error" if reply.error else completion.finish_reason, reply.error)
        if len(self.turn_versions) >= self.limits.max_turns:
            return self._finish("max_turns")
        observations = [self._bounded(m) for m in reply.messages]
        stop_text = (
            self.renderer.tokenizer.decode(completion.completion_ids[-1:])
            if completion.finish_reason == "stop"
            else ""
        )
        observation_ids = self.renderer.observation_ids(self.messages, stop_text, observations)
        after = len(self.completion_ids) + len(observation_ids)
        if (
            after >= self.limits.max_episode_tokens
            or len(self.prompt_ids) + after >= self.limits.max_context_tokens
        ):
            return self._finish("max_episode_tokens")
        self.completion_ids += observation_ids
        self.behaviour_logprobs += [0.0] * len(observation_ids)
        self.loss_mask += [0] * len(observation_ids)
        self.messages += observations
        self.turns += [{**m, "tokens": len(observation_ids)} for m in observations[:1]]
        self.turns += [dict(m) for m in observations[1:]]
        return True

    def _bounded(self, message: dict) -> dict:
        content = self.renderer.truncate(str(message.get("content", "")), self.limits.max_tool_output_tokens)
        return {**message, "content": content}

    def fail(self, reason: str) -> bool:
        """End the episode on an error of ours (not the environment's): recorded, scored 0."""
        return self._finish("error", reason)

    def _finish(self, reason: str, error: str | None = None) -> bool:
        self.finish_reason, self.error = reason, error
        if self.handle is not None:
            self.environment.close(self.handle)
            self.handle = None
        return False

    # ---- what the engine loop asks

    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def turn_budget(self) -> int:
        """New tokens the next turn may generate."""
        return min(
            self.max_new_tokens,
            self.limits.max_episode_tokens - len(self.completion_ids),
            self.limits.max_context_tokens - len(self.context_ids()),
        )

    def result(self) -> EpisodeCompletion:
        return EpisodeCompletion(
            completion_ids=self.completion_ids,
            behaviour_logprobs=self.behaviour_logprobs,
            finish_reason=self.finish_reason,
            text=self.last_text,
            prompt_ids=self.prompt_ids,
            loss_mask=self.loss_mask,
            turns=self.turns,
            turn_versions=self.turn_versions,
            environment_reward=self.environment_reward,
            error=self.error,
            token_checksum=token_checksum(self.prompt_ids, self.completion_ids),
        )
