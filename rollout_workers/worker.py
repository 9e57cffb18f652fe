"""The rollout worker: one inference engine plus the policy version it currently serves.

A plain class; the driver wraps it with `ray.remote` as a threaded actor (so it is testable
without Ray). Its engine runs in an `EngineLoop` thread that keeps it busy with every request
handed to the worker; `generate_stream` gives each prompt's group back as soon as it is done.
Its only state is its weights, so a dead worker is replaced by a fresh one loaded with the
latest adapter.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from services.component_metrics import ComponentMetrics, MetricsContext
from services.config import JobConfig
from weight_sync.adapter import AdapterWeights, WeightsRefused
from weight_sync.full_weights import FullWeights

from .engine_loop import END, EngineLoop, Finished
from .engines import make_engine
from .interface import GenerationRequest, Rollout, SamplingSettings


class StaleAdapterError(WeightsRefused):
    """Weights whose version is not newer than the one the worker already serves."""


class RolloutWorker:
    def __init__(self, worker_id: str, cfg: JobConfig, model_path: str | Path, metrics: MetricsContext | None = None):
        self.worker_id = worker_id
        self.metrics = metrics and ComponentMetrics(metrics, "rollout", worker_id, counters={
            "generated_tokens": "completion tokens generated", "generated_samples": "completions generated",
            "generation_seconds": "wall time spent generating", "adapter_loads": "adapter versions loaded",
        }, gauges={"policy_version": "policy version served", "adapter_load_seconds": "time the last load took"})
        self.version = 0  # the base model, before any adapter
        self.sha256 = ""  # checksum of the adapter served
        self.load_seconds = 0.0  # the engine's last load
        self.drain_seconds = 0.0  # how long the last load waited for running requests to finish
        self.weight_sync_state: dict = {}  # what a weight-sync transport keeps here (its process group)
        self.loop = EngineLoop(lambda: make_engine(cfg.rollout.engine, model_path, cfg),
                               served_version=lambda: self.version, on_step=self._count)
        self.engine = self.loop.engine  # used on the loop thread only

    def generate_stream(self, requests: list[GenerationRequest], sampling: SamplingSettings, min_version: int = 0):
        """Yield each prompt's group of rollouts as soon as all its samples are done (a Ray
        streaming generator). Generation starts once the worker serves `min_version` or newer."""
        batch = self.loop.submit(requests, sampling, min_version)
        while (group := batch.groups.get()) is not END:
            if isinstance(group, Exception):
                raise group
            yield [self._rollout(*finished) for finished in group]

    def generate(self, requests: list[GenerationRequest], sampling: SamplingSettings,
                 min_version: int = 0) -> list[Rollout]:
        """Every request's rollout, in request order."""
        rollouts = {r.sample_id: r for group in self.generate_stream(requests, sampling, min_version) for r in group}
        return [rollouts[request.sample_id] for request in requests]

    def _rollout(self, request: GenerationRequest, completion, version: int) -> Rollout:
        return Rollout(prompt_id=request.prompt_id, sample_index=request.sample_index,
                       prompt_ids=list(request.prompt_ids), completion_ids=completion.completion_ids,
                       behaviour_logprobs=completion.behaviour_logprobs, policy_version=version,
                       finish_reason=completion.finish_reason, text=completion.text, worker_id=self.worker_id)

    def _count(self, seconds: float, finished: list[Finished]) -> None:
        if self.metrics:
            self.metrics.add("generation_seconds", seconds)
            self.metrics.add("generated_samples", len(finished))
            self.metrics.add("generated_tokens", sum(len(c.completion_ids) for _, c, _ in finished))

    def load_adapter(self, adapter: AdapterWeights | FullWeights) -> int:
        """Serve `adapter` (a LoRA adapter, or full weights) from now on; returns the new policy
        version. Raises AdapterIntegrityError (checksum) or StaleAdapterError, keeping the current
        weights. The load waits until the requests running now finish (with the old weights).
        The version already served, with the same checksum, is a no-op: a retried sync."""
        self.drain_seconds = 0.0
        if adapter.version == self.version and adapter.sha256 == self.sha256:
            return self.version
        version, self.drain_seconds = self.loop.exclusive(lambda: self._load(adapter))
        return version

    def _load(self, adapter: AdapterWeights | FullWeights) -> int:
        """On the engine loop, with no request running."""
        if adapter.version == self.version and adapter.sha256 == self.sha256:
            return self.version
        if adapter.version <= self.version:
            raise StaleAdapterError(f"worker {self.worker_id}: adapter version {adapter.version} is not "
                                    f"newer than the served version {self.version}")
        started = time.perf_counter()
        # Both verify the checksum and the shapes before touching the served weights.
        if isinstance(adapter, FullWeights):
            self.engine.load_full_weights(adapter)
        else:
            self.engine.load_adapter(adapter)
        self.load_seconds = time.perf_counter() - started
        self.version, self.sha256 = adapter.version, adapter.sha256
        if self.metrics:
            self.metrics.add("adapter_loads")
            self.metrics.set("policy_version", self.version)
            self.metrics.set("adapter_load_seconds", self.load_seconds)
        return self.version

    def run_weight_sync(self, step, *args):
        """Run one worker-side step of a weight-sync transport (`weight_sync.transports`) here."""
        return step(self, *args)

    def policy_version(self) -> int:
        return self.version

    def close(self) -> None:
        """Stop the engine loop, so the engine can be freed (actors simply exit instead)."""
        self.loop.close()

    def running_requests(self) -> int:
        """Requests in the engine now (started, not finished)."""
        return self.loop.running_requests()

    def engine_name(self) -> str:
        return self.engine.name

    def ping(self) -> str:
        return self.worker_id

    def process_id(self) -> int:
        return os.getpid()
