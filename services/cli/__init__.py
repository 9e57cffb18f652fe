"""The `rft` command line: `main` (run, eval, grade, report, prepare-model), `jobs` (submit,
status, logs, cancel, list, scale on a Ray cluster) and `export_serve` (export, serve)."""

from services.cli.main import app

__all__ = ["app"]
