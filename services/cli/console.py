"""What `rft run` prints: a line per step, the progress bar, warnings and errors; the rest of the
logging (the driver's, and every actor's with vLLM's, DeepSpeed's, Ray's and transformers')
goes to files under runs/<job>/logs/. `--verbose` prints everything on the terminal instead."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from core.logs import LOG_DIR_ENV, LOG_FORMAT, terminal_handler

DRIVER_LOG = "driver.log"


def configure_console(run_dir: Path, verbose: bool) -> Path | None:
    """Set up the driver's logging; returns the log directory (None with --verbose). The actors
    find it in RFT_ACTOR_LOG_DIR (passed on by `setup.actor_env`) and log there themselves."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        return None
    log_dir = (run_dir / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_dir / DRIVER_LOG)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, terminal_handler(sys.stderr)])
    os.environ[LOG_DIR_ENV] = str(log_dir)
    return log_dir
