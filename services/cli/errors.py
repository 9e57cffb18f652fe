"""How the CLI's commands end on an error the user can fix from the message alone."""

from __future__ import annotations

from typing import NoReturn

import typer

from core.config import ConfigError
from core.model_store import ModelNotFoundError
from services.orchestrator.data import DatasetError

# Errors a user can fix from the message alone: print it, no traceback.
USER_ERRORS = (ConfigError, DatasetError, ModelNotFoundError, FileNotFoundError)


def fail(message: str) -> NoReturn:
    """Print `error: MESSAGE` in red on stderr and exit with status 2 (no traceback)."""
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)
