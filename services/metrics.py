"""Run metrics: one record per step, exported three ways — a Prometheus endpoint (127.0.0.1 by
default), `runs/<job>/metrics.jsonl`, and the terminal's progress bar (by the driver)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

# Gauges: the latest value of each per-step number. Name -> help text.
GAUGES = {
    "step": "learner steps completed",
    "policy_version": "policy version the learner has published",
    "reward_mean": "mean reward of the step's rollouts",
    "reward_std": "standard deviation of the step's rewards",
    "heldout_accuracy": "greedy held-out accuracy (share of items with full reward)",
    "heldout_reward_mean": "greedy held-out mean reward",
    "rollout_tokens_per_second": "completion tokens generated per second of generation wall time",
    "learner_step_seconds": "wall time of the learner's optimizer step",
    "weight_sync_seconds": "time the slowest rollout worker spent loading the new adapter",
    "is_weight_mean": "mean truncated importance weight",
    "is_weight_max": "max truncated importance weight",
    "is_truncated_fraction": "share of tokens (or sequences) whose importance ratio was truncated",
    "mismatch_kl": "KL between the engine's sampling distribution and the learner's (sampled tokens)",
    "clip_fraction": "share of tokens where the PPO clip was active",
    "entropy": "mean per-token entropy of the policy on the step's completions",
    "kl_ref": "KL to the reference (adapter disabled)",
    "grad_norm": "gradient norm before clipping",
    "loss": "policy loss",
    "zero_signal_groups": "groups in the step whose rewards were all equal",
    "completion_length_mean": "mean completion length in tokens",
    "truncated_completions_fraction": "share of completions that hit max_new_tokens",
    "staleness_max": "largest policy lag of a trained rollout",
}
# Counters: totals over the run. Name -> help text.
COUNTERS = {
    "grader_errors": "rollouts whose grader crashed, hung or returned garbage",
    "stale_rollouts_dropped": "rollouts dropped for exceeding sync.max_staleness",
    "skipped_steps": "steps skipped for a non-finite loss or gradient",
    "samples_trained": "rollouts trained on",
}


class RunMetrics:
    def __init__(self, job: str, run_dir: Path, host: str = "127.0.0.1", port: int = 9400):
        self.registry = CollectorRegistry()
        self.job = job
        self._gauges = {n: Gauge(f"rft_{n}", h, ["job"], registry=self.registry) for n, h in GAUGES.items()}
        self._counters = {n: Counter(f"rft_{n}", h, ["job"], registry=self.registry) for n, h in COUNTERS.items()}
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"{host}:{self._server.server_port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")

    def record(self, step: int, values: dict[str, float], counts: dict[str, float] | None = None) -> None:
        """Set gauges, add to counters, and append one JSON line with everything."""
        for name, value in values.items():
            if name in self._gauges and value is not None and math.isfinite(value):
                self._gauges[name].labels(self.job).set(value)
        for name, amount in (counts or {}).items():
            if amount:
                self._counters[name].labels(self.job).inc(amount)
        line = {"step": step, "time": time.time(), **values, **{f"{k}_count": v for k, v in (counts or {}).items()}}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._server.shutdown()
        self._server.server_close()
