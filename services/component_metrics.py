"""Prometheus endpoints inside the job's actors: each rollout worker, reward worker and the
learner serves its own metrics (labels `job` and `worker`) on a free port of 127.0.0.1 (or
`metrics.host`) and announces it as a file_sd target next to the driver's
(`<run_root>/prometheus-targets/<job>-<worker>.json`, component label = the actor kind), so the
Prometheus of deploy/ scrapes every component without configuration. On a multi-node cluster the
targets directory must be shared storage (the compose and KubeRay files mount the run root).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from services.metrics import TARGETS_DIRNAME, advertised_host, write_targets_file


@dataclass(frozen=True)
class MetricsContext:
    """What an actor needs to export its metrics; the job setup passes one to each actor."""
    job: str
    targets_dir: str
    host: str = "127.0.0.1"

    @classmethod
    def for_job(cls, cfg) -> "MetricsContext":
        return cls(job=cfg.name, targets_dir=str(Path(cfg.run_root).resolve() / TARGETS_DIRNAME), host=cfg.metrics.host)

    def targets_file(self, worker: str) -> Path:
        return Path(self.targets_dir) / f"{self.job}-{worker}.json"

    def forget(self, worker: str) -> None:
        """Stop announcing a worker that is gone (died, or retired by a scale-down)."""
        self.targets_file(worker).unlink(missing_ok=True)

    def forget_all(self) -> None:
        """At the job's end: stop announcing every component of the job."""
        for path in Path(self.targets_dir).glob(f"{self.job}-*.json"):
            path.unlink(missing_ok=True)


class ComponentMetrics:
    def __init__(self, context: MetricsContext, component: str, worker: str,
                 counters: dict[str, str], gauges: dict[str, str]):
        """Serve `rft_<component>_<name>` counters and gauges (name -> help text) for one worker."""
        self.registry = CollectorRegistry()
        labels = {"job": context.job, "worker": worker}
        self.counters = {name: Counter(f"rft_{component}_{name}", text, list(labels), registry=self.registry)
                         .labels(**labels) for name, text in counters.items()}
        self.gauges = {name: Gauge(f"rft_{component}_{name}", text, list(labels), registry=self.registry)
                       .labels(**labels) for name, text in gauges.items()}
        self._server, _ = start_http_server(0, addr=context.host, registry=self.registry)
        self.address = f"{context.host}:{self._server.server_port}"
        self.targets_file = context.targets_file(worker)
        write_targets_file(self.targets_file, f"{advertised_host(context.host)}:{self._server.server_port}",
                           context.job, component)

    def add(self, name: str, amount: float = 1.0) -> None:
        self.counters[name].inc(amount)

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(value)

    def close(self) -> None:
        self.targets_file.unlink(missing_ok=True)
        self._server.shutdown()
