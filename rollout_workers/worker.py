"""The rollout worker: one inference engine plus the policy version it currently serves.

A plain class; the driver wraps it with `ray.remote` as a threaded actor (so it is testable
without Ray). Its engine runs in an `EngineLoop` thread that keeps it busy with every request
handed to the worker; `generate_stream` gives each prompt's group back as soon as it is done.
Its only state is its weights, so a dead worker is replaced by a fresh one loaded with the
latest version.
"""

from __future__ import annotations

import os
import time

from core.logs import log_to_file
from core.telemetry import ComponentMetrics, MetricsContext
from weight_sync.adapter import AdapterWeights, WeightsRefused
from weight_sync.endpoints import WeightsReceiver
from weight_sync.full_weights import FullWeights

from .config import EngineSpec, RolloutConfig
from .engine_loop import END, EngineLoop, Finished
from .engines import make_engine, within_model_context
from .episodes import EpisodeCompletion, EpisodeFactory
from .interface import GenerationRequest, Rollout, SamplingSettings


class StaleWeightsError(WeightsRefused):
    """Weights whose version is not newer than the one the worker already serves."""


class RolloutWorker(WeightsReceiver):
    """Receives each policy version through `WeightsReceiver` (`sync_node_id`, `join_sync_group`,
    `receive_weights`, `served_weights`), which loads them with `load_weights`."""

    def __init__(
        self,
        worker_id: str,
        rollout: RolloutConfig,
        engine: EngineSpec,
        metrics: MetricsContext | None = None,
    ):
        log_to_file(worker_id)  # before the engine prints
        self.worker_id = worker_id
        self.metrics = metrics and ComponentMetrics(
            metrics,
            "rollout",
            worker_id,
            counters={
                "generated_tokens": "completion tokens generated",
                "generated_samples": "completions generated",
                "generation_seconds": "wall time spent generating",
                "weight_loads": "policy versions loaded",
            },
            gauges={
                "policy_version": "policy version served",
                "weight_load_seconds": "time the last load took",
            },
        )
        engine = within_model_context(engine)
        self.version = 0  # the base model, before any sync
        self.sha256 = ""  # checksum of the weights served
        self.load_seconds = 0.0  # the engine's last load
        self.drain_seconds = 0.0  # how long the last load waited for running requests to finish
        self.loop = EngineLoop(
            lambda: make_engine(rollout, engine), served_version=lambda: self.version, on_step=self._count
        )
        self.engine = self.loop.engine  # used on the loop thread only
        # Multi-turn jobs: every request is an episode with the sandboxed environment.
        self.episodes = EpisodeFactory(rollout, engine) if rollout.environment else None

    def generate_stream(
        self, requests: list[GenerationRequest], sampling: SamplingSettings, min_version: int = 0
    ):
        """Yield each prompt's group of rollouts as soon as all its samples are done (a Ray
        streaming generator). Generation starts once the worker serves `min_version` or newer."""
        episode = self.episodes.for_batch(sampling.max_new_tokens) if self.episodes else None
        batch = self.loop.submit(requests, sampling, min_version, episode)
        while (group := batch.groups.get()) is not END:
            if isinstance(group, Exception):
                raise group
            yield [self._rollout(*finished) for finished in group]

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingSettings, min_version: int = 0
    ) -> list[Rollout]:
        """Every request's rollout, in request order."""
        rollouts = {
            r.sample_id: r for group in self.generate_stream(requests, sampling, min_version) for r in group
        }
        return [rollouts[request.sample_id] for request in requests]

    def _rollout(self, request: GenerationRequest, completion, version: int) -> Rollout:
        episode = completion if isinstance(completion, EpisodeCompletion) else None
        return Rollout(
            prompt_id=request.prompt_id,
            sample_index=request.sample_index,
            prompt_ids=episode.prompt_ids if episode else list(request.prompt_ids),
            completion_ids=completion.completion_ids,
            behaviour_logprobs=completion.behaviour_logprobs,
            policy_version=version,
            finish_reason=completion.finish_reason,
            text=completion.text,
            worker_id=self.worker_id,
            **(episode.trajectory() if episode else {}),
        )

    def _count(self, seconds: float, finished: list[Finished]) -> None:
        if self.metrics:
            self.metrics.add("generation_seconds", seconds)
            self.metrics.add("generated_samples", len(finished))
            self.metrics.add("generated_tokens", sum(len(c.completion_ids) for _, c, _ in finished))

    def load_weights(self, weights: AdapterWeights | FullWeights) -> int:
        """Serve `weights` (a LoRA adapter, or full weights) from now on; returns the new policy
        version. Raises WeightsIntegrityError (checksum) or StaleWeightsError, keeping the current
        weights. The load waits until the requests running now finish (with the old weights).
        The version already served, with the same checksum, is a no-op: a retried sync."""
        self.drain_seconds = 0.0
        if self._serves(weights):  # no drain for a no-op
            return self.version
        version, self.drain_seconds = self.loop.exclusive(lambda: self._load(weights))
        return version

    def _serves(self, weights: AdapterWeights | FullWeights) -> bool:
        return weights.version == self.version and weights.sha256 == self.sha256

    def _load(self, weights: AdapterWeights | FullWeights) -> int:
        """On the engine loop, with no request running."""
        if self._serves(weights):  # a concurrent duplicate of the same sync
            return self.version
        if weights.version <= self.version:
            raise StaleWeightsError(
                f"worker {self.worker_id}: version {weights.version} is not "
                f"newer than the served version {self.version}"
            )
        started = time.perf_counter()
        # Both verify the checksum and the shapes before touching the served weights.
        if isinstance(weights, FullWeights):
            self.engine.load_full_weights(weights)
        else:
            self.engine.load_adapter(weights)
        self.load_seconds = time.perf_counter() - started
        self.version, self.sha256 = weights.version, weights.sha256
        if self.metrics:
            self.metrics.add("weight_loads")
            self.metrics.set("policy_version", self.version)
            self.metrics.set("weight_load_seconds", self.load_seconds)
        return self.version

    def policy_version(self) -> int:
        return self.version

    def close(self) -> None:
        """Stop the engine loop, so the engine can be freed (actors simply exit instead)."""
        self.loop.close()
        if self.episodes:
            self.episodes.close()

    def running_requests(self) -> int:
        """Requests in the engine now (started, not finished)."""
        return self.loop.running_requests()

    def engine_name(self) -> str:
        return self.engine.name

    def ping(self) -> str:
        return self.worker_id

    def process_id(self) -> int:
        return os.getpid()
