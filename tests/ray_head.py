"""A real Ray head for tests, on loopback ports with its own temp dir and auth token, stopped by
its own processes only (`ray stop` would kill every Ray on the machine, other users' included)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from core.net import free_port


@dataclass
class RayHead:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]  # what a client of this head needs (token auth, the venv on PATH)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: the ones whose command line names its temp dir or GCS
        address (gcs_server, raylet, dashboard, monitors, client server) and all their descendants
        (workers, actors, job drivers)."""
        marks = (str(self.temp_dir), f"127.0.0.1:{self.gcs_port}")
        me = psutil.Process()
        spared = {me.pid, *(p.pid for p in me.parents())}  # a command line of ours may name the dir too
        roots = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.pid not in spared and any(mark in cmdline for mark in marks):
                roots.append(process)
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self, grace_s: float = 15) -> None:
        processes = self.processes()
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=grace_s)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)


def start_ray_head(num_cpus: int = 2, attempts: int = 2) -> RayHead:
    """`ray start --head` gives the raylet a fixed 30 s to register, which a heavily loaded machine
    can miss: one more attempt with fresh ports and temp dir."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_ray_head_once(num_cpus)
        except RuntimeError:
            if attempt == attempts:
                raise


def _start_ray_head_once(num_cpus: int) -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="rft-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    head = RayHead(temp_dir, free_port(), free_port(), env)
    command = [
        str(Path(venv_bin) / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={head.gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={head.dashboard_port}",
        # the fixed defaults (10001, 52365) may be held by another Ray on this machine
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"ray start failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return head


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    """Poll `condition()` until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s:.0f} s")
        time.sleep(interval_s)
