"""A real Prometheus server (deploy/prometheus/prometheus.yml with test paths) finds a live RunMetrics
endpoint through the file_sd targets file it writes, scrapes it, loads the deploy alert rules and
answers PromQL over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.net import free_port
from services.orchestrator.metrics import RunMetrics

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
DEADLINE_SECONDS = 60
POLL_INTERVAL_SECONDS = 0.25

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (Debian/Ubuntu: apt-get install prometheus; "
    "`make setup` does it as root)",
)


def scrape_config_for(targets_dir: Path) -> dict:
    """The deploy config, with its rft scrape job reading targets_dir and 1 s intervals."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    rft = next(c for c in config["scrape_configs"] if c["job_name"] == "rft")
    rft["file_sd_configs"] = [{"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}]
    config["scrape_configs"] = [rft]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / rule_file) for rule_file in config["rule_files"]]
    return config


class PrometheusServer:
    def __init__(self, config: dict, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params) -> dict | None:
        """GET /api/v1/<path>; None while the server is not answering yet."""
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=5
            ) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"prometheus rejected {path} {params}: {e.code} {e.read()[:500]!r}")
        except OSError:  # not listening yet
            return None
        assert body["status"] == "success", body
        return body["data"]

    def wait_for(self, what: str, probe):
        """Poll probe() until it returns something truthy, failing at the deadline or if the server exits."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            found = probe()
            if found:
                return found
            time.sleep(POLL_INTERVAL_SECONDS)
        pytest.fail(f"prometheus: no {what} within {DEADLINE_SECONDS} s; log: {self.log.read_text()[-3000:]}")

    def query_until(self, promql: str, expected_value: float) -> dict:
        def probe():
            data = self.api("query", query=promql)
            series = data["result"] if data else []
            return series[0] if len(series) == 1 and float(series[0]["value"][1]) == expected_value else None

        return self.wait_for(f"{promql} == {expected_value}", probe)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_prometheus_scrapes_a_run_found_through_its_targets_file(tmp_path):
    metrics = RunMetrics("scraped-job", tmp_path / "runs" / "scraped-job", port=0)
    try:
        metrics.record(1, {"step": 1, "reward_mean": 0.375})
        server = PrometheusServer(scrape_config_for(metrics.discovery_file.parent), tmp_path / "prometheus")
        try:
            series = server.query_until('rft_reward_mean{job="scraped-job"}', 0.375)
            assert series["metric"]["instance"] == metrics.scrape_target
            assert series["metric"]["component"] == "driver"
            assert "exported_job" not in series["metric"], "the endpoint's own job label must be kept"

            metrics.record(2, {"step": 2, "reward_mean": 0.5})  # the next scrapes see the new value
            server.query_until('rft_reward_mean{job="scraped-job"}', 0.5)
            server.query_until('up{job="scraped-job", component="driver"}', 1.0)

            rules = server.wait_for("alert rules", lambda: (server.api("rules") or {}).get("groups"))
            alert_names = {rule["name"] for group in rules for rule in group["rules"]}
            assert {"RftNoProgress", "RftEntropyCollapse", "RftMetricsEndpointDown"} <= alert_names
        finally:
            server.stop()
    finally:
        metrics.close()
