"""The base of every config section: each folder owns its section (`learner/config.py`,
`rollout_workers/config.py`, ...); `services/config.py` composes them into the job's tree."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown fields are errors, and so is a wrong-typed assignment after loading."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and field."""
