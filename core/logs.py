"""Where log lines go: the terminal keeps what a user must see, files keep the rest.

`rft run` (without --verbose) names a directory in RFT_ACTOR_LOG_DIR; every actor then calls
`log_to_file(name)` first thing, which points its stdout and stderr -- file descriptors 1 and 2,
so C libraries' and child processes' output too -- at <dir>/<name>.log, and sends its Python
logging there at INFO. Ray forwards to the driver's terminal only what the actor writes to its
original stderr: the root logger's records that pass `TerminalFilter` (this project's warnings,
errors of any logger that propagates). vLLM, DeepSpeed and transformers log through handlers of
their own that do not propagate: all of their lines, warnings and errors too, stay in the file.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LOG_DIR_ENV = "RFT_ACTOR_LOG_DIR"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Loggers of this project: learner.group, rollout_workers.worker, rft.driver, ...
PROJECT_LOGGERS = frozenset({"core", "learner", "rollout_workers", "reward_workers", "weight_sync", "rft"})


class TerminalFilter(logging.Filter):
    """What reaches the terminal: this project's warnings and errors of any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] in PROJECT_LOGGERS


def terminal_handler(stream) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(TerminalFilter())
    return handler


def log_to_file(actor: str) -> Path | None:
    """With RFT_ACTOR_LOG_DIR set, this process's output goes to <dir>/<actor>.log (appended: a
    resumed job or a restarted actor continues the file). Returns the file, or None when the
    output stays where Ray put it (the variable unset, or the directory not writable here)."""
    directory = os.environ.get(LOG_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / f"{actor}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:  # e.g. a node that does not share the run directory
        logging.getLogger(__name__).warning("%s: output not written to %s (%s)", actor, path, e)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    forwarded = os.fdopen(os.dup(2), "w", buffering=1)  # Ray forwards this one to the terminal
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.StreamHandler(sys.stderr)  # fd 2: the log file now
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(to_file)
    root.addHandler(terminal_handler(forwarded))
    print(f"---- {actor}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    return path
