"""Run metrics: one record per step, exported three ways — a Prometheus endpoint (127.0.0.1 by
default), `runs/<job>/metrics.jsonl`, and the terminal's progress bar (by the driver).

So that a Prometheus server finds the endpoint, `RunMetrics` writes a file_sd target group
(`[{"targets": ["host:port"], "labels": {"job": <job>, "component": "driver"}}]`) to
`runs/<job>/prometheus_targets.json` and to `runs/prometheus-targets/<job>.json`, the directory
that `deploy/prometheus/prometheus.yml` watches (file_sd globs only match a file name, not a
directory); `close()` removes the latter, so a finished job stops being scraped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.telemetry import TARGETS_DIRNAME, advertised_host, write_targets_file

# Gauges: the latest value of each per-step number. Name -> help text.
GAUGES = {
    "step": "learner steps completed",
    "policy_version": "policy version the learner has published",
    "stage": "the stage the step belongs to (1-based; jobs with `stages`)",
    "reward_mean": "mean reward of the step's rollouts",
    "reward_std": "standard deviation of the step's rewards",
    "heldout_accuracy": "greedy held-out accuracy (share of items with full reward)",
    "heldout_reward_mean": "greedy held-out mean reward",
    "heldout_tool_calls_per_episode": "multi-turn jobs: tool messages per greedy held-out episode",
    "heldout_turns_per_episode": "multi-turn jobs: model turns per greedy held-out episode",
    "token_mismatch_samples": "samples of the step the learner refused: their token ids were not the "
    "ones the engine produced (token_checksum)",
    "learner_threads": "torch threads of the learner in the step, time-weighted (learner.threads)",
    "rollout_tokens_per_second": "the step's completion tokens over its generation_seconds (a lower bound "
    "while later steps overlap; rft_rollout_generated_tokens_total is the engines' rate)",
    "learner_step_seconds": "wall time of the learner's optimizer step",
    "weight_sync_seconds": "time the slowest rollout worker spent loading the new policy version",
    "is_weight_mean": "mean truncated importance weight",
    "is_weight_max": "max truncated importance weight",
    "is_truncated_fraction": "share of tokens (or sequences) whose importance ratio was truncated",
    "mismatch_kl": "KL between the engine's sampling distribution and the learner's (sampled tokens)",
    "clip_fraction": "share of tokens where the clip was active, over the step's updates (0 with one "
    "optimizer step per batch: algorithm.ppo_epochs = mini_batches = 1 makes the ratio 1)",
    "entropy": "mean per-token entropy of the policy on the step's completions",
    "padding_fraction": "share of the tokens the learner's forward passes computed that were padding",
    "kl_ref": "KL to the reference (adapter disabled)",
    "grad_norm": "gradient norm before clipping",
    "loss": "policy loss",
    "distill_reverse_kl": "distill steps: mean over the policy's tokens of behaviour minus teacher log-prob "
    "(the sampled reverse KL to the teacher per token)",
    "distill_teacher_seconds": "distill steps: wall time the teacher took to score the step's rollouts",
    "zero_signal_groups": "groups in the step whose rewards were all equal",
    "signal_groups": "groups in the step with reward variance (GRPO signal)",
    "rejection_pass_rate": "rejection_sft stages: share of the step's rollouts kept as its sft data",
    "dpo_pairs": "online dpo stages: pairs the step's groups made (best and worst, reward margin)",
    "dpo_reward_margin_mean": "dpo stages: mean of beta x the log-ratio margin of chosen over rejected",
    "dpo_preference_accuracy": "dpo stages: share of pairs whose margin is positive",
    "extra_prompts": "prompts dynamic sampling added to the step (algorithm.min_signal_groups)",
    "filter_skipped_prompts": "prompts the difficulty filter skipped for the step (data.difficulty_filter)",
    "completion_length_mean": "mean completion length in tokens",
    "truncated_completions_fraction": "share of completions that hit max_new_tokens",
    "staleness_max": "largest policy lag of a trained rollout",
    "rollout_workers": "live rollout workers (not counting ones retiring after a scale-down)",
    "generation_seconds": "wall time from submitting the step's prompts to having all its rollouts",
    "reward_seconds": "wall time the reward workers took to score the step's rollouts",
    # Set by RunMetrics itself (the driver need not pass them):
    "last_progress_timestamp_seconds": "unix time of the job's start or of its last step/evaluation record",
    "step_wall_seconds": "wall time between the last two step records "
    "(generation to sync, evaluation included)",
}
# Gauges per worker (labels job, worker). Name -> help text.
WORKER_GAUGES = {
    "weight_sync_worker_seconds": "last sync: publish until this rollout worker served the new version",
    "weight_sync_pause_seconds": "last sync: how long it kept this rollout worker from generating",
    "learner_rank_step_seconds": "last step: this learner rank's own time in it (worker learner-<rank>)",
}
# Counters: totals over the run. Name -> help text.
COUNTERS = {
    "grader_errors": "rollouts whose grader crashed, hung or returned garbage",
    "stale_rollouts_dropped": "rollouts dropped for exceeding sync.max_staleness",
    "skipped_steps": "steps skipped for a non-finite loss or gradient",
    "samples_trained": "rollouts trained on",
    "rollout_workers_replaced": "rollout workers that died and were replaced",
    "requests_reissued": "generation requests re-issued because their rollout worker died",
    "rollouts_replayed": "scored rollouts a resumed job took from the stream instead of generating again",
    "rollouts_scored": "rollouts the reward workers scored (the denominator of the grader error rate)",
    "learner_restarts": "times the learner group was restarted after a rank died or hung",
}

log = logging.getLogger("rft.metrics")
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16)
TARGETS_FILE = "prometheus_targets.json"  # in the run dir


class RunMetrics:
    def __init__(
        self,
        job: str,
        run_dir: Path,
        host: str = "127.0.0.1",
        port: int = 9400,
        targets_dir: Path | None = None,
    ):
        """Serve the metrics on host:port (0 = any free port) and announce the endpoint in
        run_dir/prometheus_targets.json and targets_dir/<job>.json (default: the run dir's
        sibling `prometheus-targets/`)."""
        self.registry = CollectorRegistry()
        self.job = job
        self._gauges = {n: Gauge(f"rft_{n}", h, ["job"], registry=self.registry) for n, h in GAUGES.items()}
        self._counters = {
            n: Counter(f"rft_{n}", h, ["job"], registry=self.registry) for n, h in COUNTERS.items()
        }
        self._hack_rate = Gauge(
            "rft_grader_hack_rate",
            "share of the step's rollouts a grader flagged as reward "
            "hacking (the grader, and each sub-grader of a multi grader)",
            ["job", "grader"],
            registry=self.registry,
        )
        self._worker_gauges = {
            n: Gauge(f"rft_{n}", h, ["job", "worker"], registry=self.registry)
            for n, h in WORKER_GAUGES.items()
        }
        self._workers = Gauge(
            "rft_workers",
            "live workers of the job by kind (rollout, reward, learner)",
            ["job", "kind"],
            registry=self.registry,
        )
        self._staleness = Histogram(
            "rft_rollout_staleness",
            "policy versions a trained rollout lagged behind the learner",
            ["job"],
            buckets=STALENESS_BUCKETS,
            registry=self.registry,
        )
        self._last_step_time: float | None = None
        self._gauges["last_progress_timestamp_seconds"].labels(job).set(time.time())
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except (
            OSError
        ) as e:  # e.g. another job on this machine has the port: Prometheus finds either via file_sd
            log.warning("metrics port %s:%d unavailable (%s); serving on a free port instead", host, port, e)
            self._server, _ = start_http_server(0, addr=host, registry=self.registry)
        self.address = f"{host}:{self._server.server_port}"
        self.scrape_target = f"{advertised_host(host)}:{self._server.server_port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        self.targets_file = run_dir / TARGETS_FILE
        self.discovery_file = (targets_dir or run_dir.parent / TARGETS_DIRNAME) / f"{job}.json"
        for path in (self.targets_file, self.discovery_file):
            write_targets_file(path, self.scrape_target, job)

    def record(
        self,
        step: int,
        values: dict[str, float],
        counts: dict[str, float] | None = None,
        hack_rates: dict[str, float] | None = None,
        workers: dict[str, int] | None = None,
        staleness: list[int] | None = None,
        per_worker: dict[str, dict[str, float]] | None = None,
    ) -> None:
        """Set gauges, add to counters, and append one JSON line with everything. `hack_rates`:
        grader name -> share of rollouts flagged (reward_workers.pool.hack_rates); `workers`:
        kind -> live count; `staleness`: the policy lag of each trained rollout."""
        for kind, count in (workers or {}).items():
            self._workers.labels(self.job, kind).set(count)
        for lag in staleness or []:
            self._staleness.labels(self.job).observe(lag)
        for name, by_worker in (per_worker or {}).items():
            for worker, value in by_worker.items():
                self._worker_gauges[name].labels(self.job, worker).set(value)
        for grader, rate in (hack_rates or {}).items():
            self._hack_rate.labels(self.job, grader).set(rate)
        for name, value in values.items():
            if name in self._gauges and value is not None and math.isfinite(value):
                self._gauges[name].labels(self.job).set(value)
        for name, amount in (counts or {}).items():
            if amount:
                self._counters[name].labels(self.job).inc(amount)
        now = time.time()
        self._gauges["last_progress_timestamp_seconds"].labels(self.job).set(now)
        if "step" in values:
            if self._last_step_time is not None:
                self._gauges["step_wall_seconds"].labels(self.job).set(now - self._last_step_time)
            self._last_step_time = now
        line = {"step": step, "time": now, **values, **{f"{k}_count": v for k, v in (counts or {}).items()}}
        if hack_rates:
            line["grader_hack_rate"] = hack_rates
        if workers:
            line["workers"] = workers
        line.update({name: by_worker for name, by_worker in (per_worker or {}).items() if by_worker})
        if staleness:
            line["staleness_histogram"] = {str(lag): staleness.count(lag) for lag in sorted(set(staleness))}
        self._write(line)

    def learner_restarted(self, step: int, reason: str) -> None:
        """Count a learner-group restart; metrics.jsonl gets a line with the reason."""
        self._counters["learner_restarts"].labels(self.job).inc()
        self._write({"step": step, "time": time.time(), "learner_restart": reason})

    def _write(self, line: dict) -> None:
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self.discovery_file.unlink(missing_ok=True)
        self._jsonl.close()
        self._server.shutdown()
        self._server.server_close()
