"""The `rft` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer
import yaml

from core.config import ConfigError
from reward_workers.config import RewardConfig
from reward_workers.grader_spec import GraderConfig, PythonGrader, check_grader, resolve_source_paths
from services.cli.errors import USER_ERRORS, fail
from services.config import load_config, parse_grader_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reinforcement fine-tuning of language models with verifiable rewards.",
)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(
        None, help="job config YAML (default with --resume: RUN_DIR/config.yaml)"
    ),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue the run in RUN_DIR from its last checkpoint"
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="join this Ray cluster instead of starting one"
    ),
    override: list[str] = typer.Option(
        [], "--set", "-o", help="override a config field: section.field=value"
    ),
    verbose: bool = typer.Option(
        False, "--verbose", help="print every log line here (default: in RUN_DIR/logs/)"
    ),
) -> None:
    """Run a job on this machine (an embedded Ray unless --address is given)."""
    from services.cli.console import configure_console
    from services.orchestrator.driver import run_job
    from services.orchestrator.setup import prepare_inputs

    try:
        if resume is not None:
            config = config or resume / "config.yaml"
            override = [f"run_root={resume.parent}", f"name={resume.name}", *override]
        if config is None:
            fail("give a job config, or --resume RUN_DIR")
        cfg = load_config(config, override + ([f"cluster.address={address}"] if address else []))
        if resume is None and (cfg.run_dir / "checkpoints").exists():
            fail(
                f"{cfg.run_dir} already has checkpoints: "
                f"use --resume {cfg.run_dir} or another name (-o name=...)"
            )
        inputs = prepare_inputs(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    from learner.checkpoint import CheckpointWorldError
    from learner.group import LearnerFailedError
    from services.orchestrator.driver import TrainingDivergedError

    log_dir = configure_console(cfg.run_dir, verbose)
    if log_dir:
        typer.echo(f"logs: {log_dir}/ (the driver's and each actor's; --verbose prints them here)")
    try:
        summary = run_job(cfg, inputs, resume=resume is not None)
    except (TrainingDivergedError, CheckpointWorldError, LearnerFailedError) as e:
        fail(str(e) + (f"\n(logs: {log_dir}/)" if log_dir else ""))
    if summary["stopped"] == "max_minutes":
        typer.echo(
            f"stopped for the time budget (max_minutes={cfg.max_minutes:g}) after {summary['steps']} of "
            f"{summary['steps_planned']} steps; rft run --resume {cfg.run_dir} continues"
        )
    from services.orchestrator.evaluation import format_comparison

    compared = {"held-out": (summary["heldout_base"], summary["heldout_final"])}
    compared |= {f"held-out {name}": (s["base"], s["final"]) for name, s in summary["heldout_sets"].items()}
    for name, (base, final) in compared.items():
        if base and final:
            typer.echo(format_comparison(name, base, final))
    # A LoRA job's output is its adapter; a full-weight job's (learner.lora: false) a model directory.
    kind = "adapter" if "adapter" in summary else "model"
    typer.echo(f"{kind}: {summary[kind]}")


def load_grader_spec(spec: str) -> GraderConfig:
    """A grader spec is a .py file with grade(sample, item), a YAML/JSON grader spec (any type,
    OpenAI RFT grader JSON included), or a job config (its reward.grader)."""
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--grader: {spec} not found")
    if path.suffix == ".py":
        grader = PythonGrader(source=str(path.resolve()), name=path.stem)
    else:
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"grader spec {path} is not valid YAML/JSON: {e}") from None
        if isinstance(raw, dict) and isinstance(raw.get("reward"), dict):
            raw = raw["reward"].get("grader")
        resolve_source_paths(raw, path.parent)
        grader = parse_grader_spec(raw, str(path))
    check_grader(grader, where="grader")
    return grader


@app.command(name="eval")
def evaluate(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="HF model dir, e.g. runs/<job>/model of a "
        "full-weight job (default: embedded SmolLM2-135M-Instruct)",
    ),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="peft LoRA adapter dir to apply"),
    data: Path = typer.Option(..., "--data", help="JSONL items in the job format"),
    grader: str = typer.Option(
        ..., "--grader", help=".py file with grade(sample, item), or a grader YAML/JSON"
    ),
    engine: str = typer.Option("auto", "--engine", help="auto | vllm | hf"),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", help="new tokens a reply (a turn, with an environment)"
    ),
    environment: Optional[Path] = typer.Option(
        None,
        "--environment",
        help="multi-turn: a job config (its rollout.environment and episode limits), an "
        "environment spec YAML, or a .py file of tool functions",
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate the first N items"),
    output: Optional[Path] = typer.Option(None, "--output", help="write per-item results as JSONL"),
) -> None:
    """Greedy accuracy and mean reward of a model (+ adapter) on a dataset, graded in the sandbox;
    with --environment, greedy episodes."""
    from services.tools.offline_eval import eval_rollout, evaluate_model

    try:
        grader_cfg = load_grader_spec(grader)
        rollout = eval_rollout(engine, max_new_tokens, environment)
        summary = evaluate_model(
            model, adapter, data, RewardConfig(grader=grader_cfg), rollout, limit, output
        )
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(
        f"accuracy {summary['accuracy']:.3f}  mean reward {summary['reward_mean']:.3f}  "
        f"(n={summary['count']})"
    )


@app.command()
def grade(
    grader: str = typer.Option(
        ..., "--grader", help="grader spec YAML/JSON (OpenAI RFT grader JSON too), or a .py file"
    ),
    data: Path = typer.Option(..., "--data", help="JSONL items in the job format"),
    samples: Path = typer.Option(
        ..., "--samples", help='JSONL {"id", "output_text"}, or a run\'s samples.jsonl'
    ),
    output: Optional[Path] = typer.Option(None, "--output", help="write per-sample results as JSONL"),
    allow_weak_isolation: bool = typer.Option(
        False, "--allow-weak-isolation", help="grade even where the sandbox cannot make namespaces"
    ),
) -> None:
    """Score samples offline in the grader sandbox: per-sample scores, errors and hack flags,
    then a summary."""
    from core.sandbox.namespaces import SandboxUnavailableError
    from services.tools.offline_eval import grade_samples, result_record

    try:
        reward = RewardConfig(grader=load_grader_spec(grader), allow_weak_isolation=allow_weak_isolation)
        scored, summary = grade_samples(reward, data, samples)
    except (*USER_ERRORS, SandboxUnavailableError) as e:
        fail(str(e))
    if output:
        output.write_text("".join(json.dumps(result_record(s)) + "\n" for s in scored))
    for s in scored:
        parts = [f"{s.rollout.sample_id}  reward {s.reward:.3f}"]
        parts += [f"{name} {value:.3f}" for name, value in s.components.items()]
        if s.hack_flags:
            parts.append(f"HACK {','.join(s.hack_flags)}")
        if s.grader_error:
            parts.append(f"ERROR {s.grader_error.splitlines()[0]}")
        typer.echo("  ".join(parts))
        for diagnostic in s.diagnostics[:3]:  # e.g. "floats failed: Traceback ... AssertionError"
            lines = diagnostic.strip().splitlines() or [""]
            typer.echo(f"    {lines[0][:120]}" + (f" ... {lines[-1][:120]}" if len(lines) > 1 else ""))
    typer.echo(json.dumps(summary, indent=2))
    means = ", ".join(f"{name} {value:.3f}" for name, value in summary["reward_mean_by_grader"].items())
    typer.echo(
        f"mean reward: {means}  errors {summary['grader_error_rate']:.3f}  "
        f"hacks {max(summary['hack_rate_by_grader'].values()):.3f}  (n={summary['count']})"
    )


@app.command(name="prepare-model")
def prepare_model() -> None:
    """Convert the embedded SmolLM2-135M-Instruct into the user cache (done once; idempotent)."""
    from core.model_store import ensure_default_model

    try:
        typer.echo(ensure_default_model())
    except USER_ERRORS as e:
        fail(str(e))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory, runs/<job>"),
    output: Optional[Path] = typer.Option(None, "--output", help="where to write (default: RUN_DIR/report)"),
    samples: int = typer.Option(
        6, "--samples", min=1, help="sample completions shown for the first and last step"
    ),
) -> None:
    """PNG plots of the run's curves and an HTML page with them and sample completions."""
    from services.tools.report import ReportError, write_report

    try:
        typer.echo(write_report(run_dir, output, samples))
    except (*USER_ERRORS, ReportError) as e:
        fail(str(e))


from services.cli.export_serve import register_export_serve_commands  # noqa: E402  (export, serve)
from services.cli.jobs import register_job_commands  # noqa: E402  (submit, status, logs, cancel, list, scale)

register_job_commands(app)
register_export_serve_commands(app)

if __name__ == "__main__":
    sys.exit(app())
