"""The rollout worker: one inference engine plus the policy version it currently serves.

A plain class; the driver wraps it with `ray.remote` (so it is testable without Ray). Its only
state is its weights, so a dead worker is replaced by a fresh one loaded with the latest adapter.
"""
from __future__ import annotations

import time
from pathlib import Path

from services.config import JobConfig
from weight_sync.adapter import AdapterWeights

from .engines import make_engine
from .interface import GenerationRequest, Rollout, SamplingSettings


class StaleAdapterError(ValueError):
    """An adapter whose version is not newer than the one the worker already serves."""


class RolloutWorker:
    def __init__(self, worker_id: str, cfg: JobConfig, model_path: str | Path):
        self.worker_id = worker_id
        self.engine = make_engine(cfg.rollout.engine, model_path, cfg)
        self.version = 0  # the base model, before any adapter
        self.load_seconds = 0.0

    def generate(self, requests: list[GenerationRequest], sampling: SamplingSettings) -> list[Rollout]:
        completions = self.engine.generate([r.prompt_ids for r in requests], sampling)
        return [Rollout(prompt_id=r.prompt_id, sample_index=r.sample_index, prompt_ids=list(r.prompt_ids),
                        completion_ids=c.completion_ids, behaviour_logprobs=c.behaviour_logprobs,
                        policy_version=self.version, finish_reason=c.finish_reason, text=c.text,
                        worker_id=self.worker_id)
                for r, c in zip(requests, completions, strict=True)]

    def load_adapter(self, adapter: AdapterWeights) -> int:
        """Serve `adapter` from now on; returns the new policy version. Raises
        AdapterIntegrityError (checksum) or StaleAdapterError, keeping the current weights."""
        if adapter.version <= self.version:
            raise StaleAdapterError(f"worker {self.worker_id}: adapter version {adapter.version} is not "
                                    f"newer than the served version {self.version}")
        started = time.perf_counter()
        self.engine.load_adapter(adapter)  # verifies the checksum before touching the weights
        self.load_seconds = time.perf_counter() - started
        self.version = adapter.version
        return self.version

    def last_load_seconds(self) -> float:
        """How long the last load_adapter took here (not counting time queued behind generation)."""
        return self.load_seconds

    def policy_version(self) -> int:
        return self.version

    def engine_name(self) -> str:
        return self.engine.name

    def ping(self) -> str:
        return self.worker_id
