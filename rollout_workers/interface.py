"""What a rollout worker takes and returns, and the engine interface both engines implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only for annotations: reward actors unpickle Rollouts without importing torch
    from weight_sync.adapter import AdapterWeights


@dataclass(frozen=True)
class GenerationRequest:
    """One sample to generate: sample `sample_index` of the group for prompt `prompt_id`."""

    prompt_id: str
    sample_index: int
    prompt_ids: list[int]
    item: dict | None = None  # the dataset item, for an environment's reset (multi-turn jobs)

    @property
    def sample_id(self) -> str:
        return f"{self.prompt_id}#{self.sample_index}"


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 = greedy (evaluation). Sampling uses the full distribution softened by
    `temperature` (no top-k/top-p), which is exactly what the learner scores."""

    temperature: float
    max_new_tokens: int
    seed: int | None = None


@dataclass
class Completion:
    completion_ids: list[int]
    # log p(token) under softmax(logits / temperature), one per completion token.
    behaviour_logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"
    text: str


@dataclass
class Rollout:
    prompt_id: str
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    policy_version: int
    finish_reason: str
    text: str  # the completion; of an episode, its last assistant message (what graders score)
    worker_id: str = ""
    # Episodes (docs/agentic.md): completion_ids hold model and observation tokens interleaved;
    # loss_mask 1 = sampled by the policy (None = every token, a single turn).
    loss_mask: list[int] | None = None
    turns: list[dict] | None = None  # the episode's messages, for logs and graders
    turn_versions: list[int] | None = None  # the policy version of each model turn
    environment_reward: float = 0.0  # the environment's per-turn rewards, summed
    token_checksum: str | None = None  # core/tokens.py, over prompt_ids + completion_ids
    error: str | None = None  # why the episode ended early on an error

    @property
    def sample_id(self) -> str:
        return f"{self.prompt_id}#{self.sample_index}"


class InferenceEngine(Protocol):
    """An engine generates step by step: requests are added at any time and join the running
    batch (continuous batching); `step()` advances every running request and returns those that
    finished. Only one thread may call an engine (the worker's engine loop)."""

    name: str

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingSettings) -> None:
        """Start generating one completion; `sampling.seed` is this request's own seed."""
        ...

    def step(self) -> list[tuple[str, Completion]]:
        """Advance the running requests; (request_id, completion) of each that finished."""
        ...

    def has_unfinished(self) -> bool: ...

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        """One completion per prompt, in order, run to completion (evaluation, benchmarks)."""
        ...

    def load_adapter(self, adapter: "AdapterWeights") -> None:
        """Generate with this LoRA adapter from now on (replacing any earlier one). Called only
        when no request is running."""
        ...
