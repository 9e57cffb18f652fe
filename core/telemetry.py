"""Prometheus endpoints inside the job's actors: each rollout worker, reward worker and the
learner serves its own metrics (labels `job` and `worker`) on a free port of 127.0.0.1 (or
`metrics.host`) and announces it as a file_sd target next to the driver's
(`<run_root>/prometheus-targets/<job>-<worker>.json`, component label = the actor kind), so the
Prometheus of deploy/ scrapes every component without configuration. On a multi-node cluster the
targets directory must be shared storage (the compose and KubeRay files mount the run root).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

TARGETS_DIRNAME = "prometheus-targets"  # next to the run dirs: one <job>.json per running job
ADVERTISE_HOST_ENV = "RFT_METRICS_ADVERTISE_HOST"  # the host name Prometheus should scrape


def advertised_host(bind_host: str) -> str:
    """The host name a scraper should use: $RFT_METRICS_ADVERTISE_HOST, else the bind address,
    else (bound to all interfaces) this machine's host name."""
    if os.environ.get(ADVERTISE_HOST_ENV):
        return os.environ[ADVERTISE_HOST_ENV]
    return socket.gethostname() if bind_host in ("", "0.0.0.0", "::") else bind_host


def write_targets_file(path: Path, target: str, job: str, component: str = "driver") -> None:
    """One file_sd target group, written atomically (Prometheus may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(
        json.dumps([{"targets": [target], "labels": {"job": job, "component": component}}], indent=2)
    )
    os.replace(staging, path)


@dataclass(frozen=True)
class MetricsContext:
    """What an actor needs to export its metrics; the job setup passes one to each actor."""

    job: str
    targets_dir: str
    host: str = "127.0.0.1"

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
    def __init__(
        self,
        context: MetricsContext,
        component: str,
        worker: str,
        counters: dict[str, str],
        gauges: dict[str, str],
    ):
        """Serve `rft_<component>_<name>` counters and gauges (name -> help text) for one worker."""
        self.registry = CollectorRegistry()
        labels = {"job": context.job, "worker": worker}
        self.counters = {
            name: Counter(f"rft_{component}_{name}", text, list(labels), registry=self.registry).labels(
                **labels
            )
            for name, text in counters.items()
        }
        self.gauges = {
            name: Gauge(f"rft_{component}_{name}", text, list(labels), registry=self.registry).labels(
                **labels
            )
            for name, text in gauges.items()
        }
        self._server, _ = start_http_server(0, addr=context.host, registry=self.registry)
        self.address = f"{context.host}:{self._server.server_port}"
        self.targets_file = context.targets_file(worker)
        write_targets_file(
            self.targets_file,
            f"{advertised_host(context.host)}:{self._server.server_port}",
            context.job,
            component,
        )

    def add(self, name: str, amount: float = 1.0) -> None:
        self.counters[name].inc(amount)

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(value)

    def close(self) -> None:
        self.targets_file.unlink(missing_ok=True)
        self._server.shutdown()
