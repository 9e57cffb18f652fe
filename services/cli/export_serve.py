"""`rft export | serve`: after training, a run's policy as a directory of its own (services/tools/
export.py), or behind vLLM's OpenAI-compatible server (services/tools/serve.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from services.cli.errors import USER_ERRORS, fail
from services.tools.export import ExportError

EXPORT_ERRORS = (*USER_ERRORS, ExportError)


def export(
    run_dir: Path = typer.Argument(..., help="a run directory, runs/<job>"),
    output: Path = typer.Option(..., "--output", "-o", help="directory to write (new or empty)"),
    merge: bool = typer.Option(
        False, "--merge", help="fold the adapter into the base model: one Hugging Face model directory"
    ),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="export checkpoints/step_N's adapter instead of the final one"
    ),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
) -> None:
    """Copy a run's trained adapter to a directory of its own, or with --merge a merged model.

    The adapter goes with the base model's tokenizer and a note naming the base model and the job;
    the merged model loads with transformers and vLLM; a full-weight run's model/ is copied as is."""
    from services.tools.export import export_run

    try:
        info = export_run(run_dir, output, merge, checkpoint, force)
    except EXPORT_ERRORS as e:
        fail(str(e))
    if merge and info["exported"] == "model":
        typer.echo(f"{run_dir} trained full weights: its model is exported as it is (nothing to merge)")
    typer.echo(f"{info['exported']} of job {info['job']} written to {output}")


def serve(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="a run directory (runs/<job>) or a model directory"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", help="longest prompt + completion (default: the model's own)"
    ),
    kv_cache_gib: int = typer.Option(
        1, "--kv-cache-gib", min=1, help="KV cache on CPU (VLLM_CPU_KVCACHE_SPACE, unless already set)"
    ),
    ready_timeout_s: float = typer.Option(
        900, "--ready-timeout", help="seconds to wait for the server to answer"
    ),
) -> None:
    """Serve a run's policy, or a model directory, with vLLM's OpenAI-compatible server.

    A LoRA run's adapter is served on its base model as a LoRA module named after the job.
    Arguments after `--` go to vLLM."""
    from services.tools.serve import serve_target, vllm_server_command, vllm_server_env, wait_until_ready

    try:
        target = serve_target(path)
    except EXPORT_ERRORS as e:
        fail(str(e))
    url = f"http://{host}:{port}"
    command = vllm_server_command(target, host, port, max_model_len, ctx.args)
    typer.echo(f"starting vLLM for {path}: {url}/v1, model {target.name!r}")
    # SIGTERM ends this process through `finally`, so the server never outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = subprocess.Popen(command, env=vllm_server_env(kv_cache_gib))
    try:
        if not wait_until_ready(url, server, ready_timeout_s):
            fail(f"the vLLM server did not answer at {url} (exit status {server.poll()}; its log is above)")
        typer.echo(f"ready: {url}/v1  model {target.name!r}  (Ctrl-C stops it)")
        sys.exit(server.wait())
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def register_export_serve_commands(app: typer.Typer) -> None:
    app.command()(export)
    # Unknown options after the path are vLLM's, passed through.
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve)
