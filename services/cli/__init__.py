"""The `rft` command line: `main` (run, eval, grade, report, prepare-model) and `jobs` (submit,
status, logs, cancel, list, scale on a Ray cluster)."""

from services.cli.main import app

__all__ = ["app"]
