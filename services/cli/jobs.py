"""`rft submit | status | logs | cancel | list | scale`: jobs on a Ray cluster through the Ray Jobs
API, with progress from the job registry (services/jobs/registry.py).

One id names a job everywhere: the Ray submission id, the registry entry, the run dir
(`<run_root>/<id>`) and the actors' names. `submit` loads and checks the config here (so a bad field
fails before anything is sent), uploads the config's directory as the job's working dir, and runs
`python -m services.cli run CONFIG --address auto -o name=ID -o run_root=ABS ...` on the head.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from core.config import ConfigError
from services.cli.errors import fail
from services.config import dump_config, load_config
from services.jobs.redis_store import RedisUnavailableError, embedded_data_dir
from services.jobs.registry import (
    FAILED,
    TERMINAL_STATES,
    JobNotFoundError,
    JobRecord,
    JobRegistry,
    open_registry,
)

ADDRESS_HELP = "Ray dashboard address of the cluster, http://HEAD:PORT (or $RAY_ADDRESS)"
REDIS_HELP = "the registry's Redis (default: the embedded store under the job's run root)"
RUN_ROOT_HELP = "run root whose embedded registry to read for jobs without one recorded"
# Job metadata keys: where the driver of each job keeps its registry.
META_RUN_ROOT, META_REDIS_URL, META_OWNER = "rft_run_root", "rft_redis_url", "rft_owner"

# Piped output (scripts, tests) gets whole table rows instead of rows wrapped at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)


# ---------------------------------------------------------------- Ray Jobs client


def enable_token_auth_when_token_present() -> None:
    """Ray 2.60 clusters require a token (`Authorization: Bearer`), which the Jobs client sends
    only with RAY_AUTH_MODE=token; it reads the token from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token. Set the mode when a token is there and the user chose none."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def cluster_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        fail("--address: give the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    return address


def jobs_client(address: Optional[str]):
    enable_token_auth_when_token_present()
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        fail(f"--address {address}: cannot reach the Ray Jobs API ({e})")


def job_exists(client, job_id: str) -> bool:
    try:
        client.get_job_info(job_id)
        return True
    except RuntimeError:  # the Jobs API answers 404 for an unknown id
        return False


def ray_job(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        fail(f"job {job_id}: {e}")


# ---------------------------------------------------------------- registry lookup


class Registries:
    """Registry clients by location, opened once. The embedded store is opened only where it
    already exists, so looking at jobs never creates files."""

    def __init__(self, redis_url: Optional[str], run_root: Path):
        self.redis_url, self.run_root = redis_url, run_root
        self._open: dict[str, JobRegistry | None] = {}
        self.problems: list[str] = []

    def for_job(self, metadata: dict | None) -> JobRegistry | None:
        metadata = metadata or {}
        url = self.redis_url or metadata.get(META_REDIS_URL) or None
        run_root = Path(metadata.get(META_RUN_ROOT) or self.run_root)
        location = url or str(embedded_data_dir(run_root))
        if location not in self._open:
            self._open[location] = self._connect(url, run_root)
        return self._open[location]

    def _connect(self, url: str | None, run_root: Path) -> JobRegistry | None:
        if not url and not embedded_data_dir(run_root).is_dir():
            self.problems.append(f"no registry under {run_root} (pass --redis-url or --run-root)")
            return None
        try:
            return open_registry(run_root, url)
        except RedisUnavailableError as e:
            self.problems.append(str(e))
            return None

    def record(self, job_id: str, ray_status: str, metadata: dict | None) -> JobRecord | None:
        """The job's registry record, after copying Ray's final state into it if the driver could not."""
        registry = self.for_job(metadata)
        if registry is None:
            return None
        registry.reconcile_with_ray(job_id, ray_status)
        return registry.find(job_id)

    def report_problems(self) -> None:
        for problem in dict.fromkeys(self.problems):
            console.print(f"[yellow]registry: {problem}[/yellow]")


def _registries(redis_url: Optional[str], run_root: Path) -> Registries:
    return Registries(redis_url or os.environ.get("RFT_REDIS_URL"), run_root)


# ---------------------------------------------------------------- formatting


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _when(seconds: float | None) -> str:
    return "-" if not seconds else datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _workers(workers: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in workers.items()) or "-"


def progress_cells(record: JobRecord | None) -> list[str]:
    if record is None:
        return ["-"] * 6
    return [
        record.state,
        str(record.step) + (f" (stage {record.metrics['stage']:.0f})" if "stage" in record.metrics else ""),
        str(record.policy_version),
        _number(record.metrics.get("reward_mean")),
        _number(record.metrics.get("heldout_accuracy")),
        _workers(record.workers),
    ]


def jobs_table(client, registries: Registries) -> Table:
    table = Table(title="rft jobs")
    for column in (
        "job",
        "ray state",
        "registry state",
        "step",
        "version",
        "reward",
        "held-out",
        "workers",
        "owner",
        "started",
    ):
        table.add_column(column)
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        if not job.submission_id:
            continue  # drivers that connected directly, not submitted jobs
        record = registries.record(job.submission_id, str(job.status), job.metadata)
        owner = record.owner if record else (job.metadata or {}).get(META_OWNER, "-")
        table.add_row(
            job.submission_id,
            str(job.status),
            *progress_cells(record),
            owner,
            _when((job.start_time or 0) / 1000),
        )
    return table


def print_job_detail(job, record: JobRecord | None) -> None:
    console.print(f"[bold]{job.submission_id}[/bold]  ray: {job.status}  {job.message or ''}")
    console.print(f"  entrypoint: {job.entrypoint}")
    if record is None:
        return
    console.print(f"  registry: {record.state}   owner {record.owner}   run dir {record.run_dir}")
    console.print(
        f"  step {record.step}   policy version {record.policy_version}   "
        f"reward {_number(record.metrics.get('reward_mean'))}   "
        f"held-out {_number(record.metrics.get('heldout_accuracy'))}   workers {_workers(record.workers)}"
    )
    if record.desired_rollout_workers is not None:
        console.print(f"  desired rollout workers: {record.desired_rollout_workers}")
    for change in record.history:
        console.print(f"  {_when(change.at)}  {change.state:<9} ({change.source})")


def job_entrypoint(config: Path, job_overrides: list[str], run_root: Path, python: str) -> tuple[str, dict]:
    """The command the cluster runs (`rft run` joining the cluster) and its runtime env: the
    config's directory as the working dir, less the run root and caches."""
    working_dir = config.resolve().parent
    entrypoint = shlex.join(
        [
            python,
            "-m",
            "services.cli",
            "run",
            config.name,
            "--address",
            "auto",
            *(a for o in job_overrides for a in ("-o", o)),
        ]
    )
    excludes = [".rft", "__pycache__"]
    if run_root.is_relative_to(working_dir):
        excludes.append(str(run_root.relative_to(working_dir)))
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": excludes,
        # the driver's ray.init adds actor env vars; let them merge with the job's
        "env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "HF_HUB_OFFLINE": "1"},
    }
    return entrypoint, runtime_env


def submit_when_agent_is_up(
    client,
    job_id: str,
    submission: dict,
    registry: JobRegistry | None,
    address: Optional[str],
    agent_wait_s: float,
) -> None:
    """Submit; a head that has just started refuses until its dashboard agent is up, so retry
    that refusal for `agent_wait_s`. Any other failure marks the job FAILED and exits."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            client.submit_job(**submission)
            return
        except RuntimeError as e:
            no_agent = "No available agent" in str(e)
            if not no_agent or time.monotonic() > deadline:
                if registry is not None:
                    registry.transition(job_id, FAILED, source="submit")
                hint = (
                    "\n  the head's dashboard agent is not up: see dashboard_agent.log in the head's Ray "
                    "session logs (a common cause: its port, 52365 by default, held by another Ray on "
                    "that machine)"
                    if no_agent
                    else ""
                )
                fail(f"submitting {job_id} to {cluster_address(address)}: {e}{hint}")
            time.sleep(1)


# ---------------------------------------------------------------- commands


def submit(
    config: Path = typer.Argument(..., help="job config YAML; its directory is uploaded as the working dir"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    override: list[str] = typer.Option(
        [], "--set", "-o", help="override a config field: section.field=value"
    ),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="default: <name>-<date>-<time>"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    python: str = typer.Option("python", "--python", help="Python on the cluster that has rft installed"),
    agent_wait_s: float = typer.Option(
        120, "--agent-wait", help="seconds to wait for a just-started head's job agent"
    ),
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API)."""
    try:
        cfg = load_config(config, override)
    except ConfigError as e:
        fail(str(e))
    job_id = job_id or f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    redis_url = redis_url or os.environ.get("RFT_REDIS_URL") or cfg.cluster.redis_url
    run_root = Path(cfg.run_root).expanduser().resolve()  # relative to here, as with `rft run`
    job_overrides = [*override, f"name={job_id}", f"run_root={run_root}"]
    if redis_url:
        job_overrides.append(f"cluster.redis_url={redis_url}")
    cfg = load_config(config, job_overrides)
    entrypoint, runtime_env = job_entrypoint(config, job_overrides, run_root, python)
    owner = getpass.getuser()
    metadata = {META_RUN_ROOT: str(run_root), META_REDIS_URL: redis_url or "", META_OWNER: owner}
    client = jobs_client(address)
    if job_exists(client, job_id):
        fail(f"--job-id {job_id}: the cluster already has a job with this id")
    registry = None
    try:
        registry = open_registry(run_root, redis_url)
        registry.register(job_id, dump_config(cfg), cfg.run_dir, owner, source="submit")
    except RedisUnavailableError as e:
        console.print(f"[yellow]registry: {e}; the job is submitted without a registry entry[/yellow]")
    submit_when_agent_is_up(
        client,
        job_id,
        dict(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env, metadata=metadata),
        registry,
        address,
        agent_wait_s,
    )
    typer.echo(
        f"submitted {job_id}\n  run dir: {cfg.run_dir}\n  follow: rft logs {job_id} --follow"
        f" --address {cluster_address(address)}"
    )


def status(
    job_id: Optional[str] = typer.Argument(None, help="one job (default: all)"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    run_root: Path = typer.Option(Path("runs"), "--run-root", help=RUN_ROOT_HELP),
) -> None:
    """Ray's state of a job (or all) with step, policy version, reward, held-out score, workers."""
    client, registries = jobs_client(address), _registries(redis_url, run_root)
    if job_id is None:
        console.print(jobs_table(client, registries))
    else:
        job = ray_job(client, job_id)
        print_job_detail(job, registries.record(job_id, str(job.status), job.metadata))
    registries.report_problems()


def list_jobs(
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    run_root: Path = typer.Option(Path("runs"), "--run-root", help=RUN_ROOT_HELP),
) -> None:
    """All jobs submitted to the cluster, one row each."""
    client, registries = jobs_client(address), _registries(redis_url, run_root)
    console.print(jobs_table(client, registries))
    registries.report_problems()


def logs(
    job_id: str = typer.Argument(...),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
) -> None:
    """The job's driver output (stdout and stderr)."""
    client = jobs_client(address)
    ray_job(client, job_id)  # a clear error for an unknown id
    if not follow:
        typer.echo(client.get_job_logs(job_id), nl=False)
        return

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            typer.echo(chunk, nl=False)

    asyncio.run(tail())
    typer.echo(f"-- {job_id}: {client.get_job_status(job_id)}")


def cancel(
    job_id: str = typer.Argument(...),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    run_root: Path = typer.Option(Path("runs"), "--run-root", help=RUN_ROOT_HELP),
    wait_s: float = typer.Option(60, "--wait", help="seconds to wait for the job to stop"),
) -> None:
    """Stop a job (SIGTERM to its driver, which shuts its actors down) and wait until Ray says it ended."""
    client = jobs_client(address)
    job = ray_job(client, job_id)
    if str(job.status) in TERMINAL_STATES:
        fail(f"job {job_id} already ended: {job.status}")
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while str(job.status) not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.5)  # polling Ray's state with a deadline
        job = ray_job(client, job_id)
    if str(job.status) not in TERMINAL_STATES:
        fail(f"job {job_id} still {job.status} after {wait_s:.0f} s")
    _registries(redis_url, run_root).record(job_id, str(job.status), job.metadata)
    typer.echo(f"{job_id}: {job.status}")


def scale(
    job_id: str = typer.Argument(...),
    rollout_workers: int = typer.Option(
        ..., "--rollout-workers", min=1, help="desired number of rollout workers"
    ),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    run_root: Path = typer.Option(Path("runs"), "--run-root", help="run root of the job's embedded registry"),
) -> None:
    """Ask a running job for N rollout workers (the driver applies it at its next step)."""
    registries = _registries(redis_url, run_root)
    registry = registries.for_job(None)
    if registry is None:
        fail("; ".join(registries.problems))
    try:
        registry.set_desired_rollout_workers(job_id, rollout_workers)
    except JobNotFoundError as e:
        fail(str(e))
    typer.echo(
        f"{job_id}: desired rollout workers = {rollout_workers}; the driver applies it at its next step"
    )


def register_job_commands(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(cancel)
    app.command(name="list")(list_jobs)
    app.command()(scale)
